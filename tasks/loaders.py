"""Where tasks come from: the built-in generator, the SAPO/O-LoRA directory layout, original Super-NaturalInstructions
task files, or a Hugging Face dataset. Instance order is the file's order (the first n are used, never a shuffle).

SAPO layout (as in ../shared/data/superni; TRACE uses the same one):
    <data_dir>/instructions.json               task -> {"instruction", "suffix", "labels", "input_label", ...}
    <data_dir>/<task>/{train,dev,test}.json    [{"sentence": input, "label": answer}, ...]
    <data_dir>/order/<sequence>/<k>-<task>/train_tasks.json   [{"dataset_name": task}, ...]: task trained at step k
`instruction` may be empty (TRACE's Py150); `input_label` (optional) replaces the prompt's "Text:" line.

Every instance is checked when it is loaded, whatever the source: the input must be a string; a reference a string, a
number (TRACE's NumGLUE answers; kept as str(number)) or a non-empty list of those. Anything else (null, true/false,
an object, an empty list) is a one-line error naming the file, the record (counted from 0) and the field.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path

from tasks.core import SPLITS, Instance, Sequence, Task
from tasks.errors import SapoError

# Task orders of the named real-data sequences (short SuperNI ids resolve to `taskNNN_*` directories).
NAMED_SEQUENCES = {
    "ni_seq_g1": ["task589", "task141", "task618", "task339", "task360"],
    "ni_seq_c1": ["task195", "task1310", "task273", "task611", "task224"],
    "ni_seq_m1": ["task195", "task360", "task611", "task002", "task224"],
    "trace": ["C-STANCE", "FOMC", "MeetingBank", "Py150", "ScienceQA", "NumGLUE-cm"],
}


_REQUIRED = object()


def read_json(path, default=_REQUIRED, advice: str = "") -> object:
    """json.load with a one-line error naming the file (and the position for malformed JSON), ending in `advice`
    (what to do about a damaged run file) when given.

    The project's one JSON reader: a missing file is an error unless a `default` is given (run files and caches
    that are not written yet); a damaged file is always an error, never silently ignored or recomputed over.
    Records read back are then checked for shape by tasks.records (with the same advice).
    """
    advice = f"; {advice}" if advice else ""
    path = Path(path)
    if not path.exists():
        if default is not _REQUIRED:
            return default
        raise SapoError(f"file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise SapoError(f"malformed JSON in {path}: {e.msg} at line {e.lineno} column {e.colno}{advice}") from None
    except UnicodeDecodeError as e:
        raise SapoError(f"{path} is not UTF-8 text: {e.reason}{advice}") from None


def write_text_atomic(path, text: str):
    """Write to a temporary file next to `path`, then rename: a reader (or a crash) never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)  # mkstemp makes the file private; results are for everyone to read
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def non_finite_at(obj, where: str = "") -> str | None:
    """Where the first NaN or infinity inside `obj` is (a key path such as scores.task1.rougeL), or None."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return f"{where or 'the value'} = {obj}"
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    for k, v in items:
        found = non_finite_at(v, f"{where}[{k}]" if isinstance(k, int) else f"{where}.{k}" if where else str(k))
        if found:
            return found
    return None


def strict_json(obj, where, indent: int | None = None) -> str:
    """json.dumps, strict: NaN and Infinity are not JSON (Python writes them, strict readers refuse them). A
    non-finite number is an error naming `where` (the file) and the key, never written."""
    try:
        return json.dumps(obj, indent=indent, ensure_ascii=False, allow_nan=False)
    except ValueError:
        found = non_finite_at(obj)
        if found is None:
            raise
        raise SapoError(f"refusing to write {found} into {where}: a non-finite number is not JSON") from None


def write_json(path, obj, indent: int = 2):
    """Strict JSON to `path`, atomically."""
    write_text_atomic(path, strict_json(obj, path, indent) + "\n")


def _check_dir(data_dir) -> Path:
    path = Path(data_dir)
    if not path.is_dir():
        raise SapoError(f"data directory not found: {data_dir}")
    return path


def resolve_task_dir(data_dir, name: str) -> Path:
    """`task195` or `task195_sentiment140_classification` -> the task's directory under data_dir."""
    root = _check_dir(data_dir)
    if (root / name).is_dir():
        return root / name
    matches = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(name + "_"))
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        raise SapoError(f"task {name!r} is ambiguous in {data_dir}: {', '.join(p.name for p in matches)}")
    raise SapoError(f"task {name!r} not found in {data_dir}")


def _json_type(value) -> str:
    """How a JSON value's type is called in an error message."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return {dict: "an object", list: "a list", str: "a string"}.get(type(value), type(value).__name__)


def _reference(value) -> str | None:
    """A reference answer as text: a string as is, a finite int/float as str(value); None for anything else."""
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return str(value)
    return None


def encoding_problem(text: str) -> str | None:
    """Why `text` cannot be tokenized, or None. JSON may hold a lone surrogate (\\ud800), which is no character: no
    tokenizer encodes it (UTF-8 has no bytes for it), and it would fail deep inside scoring or training."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return (f"holds a lone surrogate {text[e.start]!r} at character {e.start}, which no tokenizer can encode "
                "(fix the text: an emoji or other character split in half)")
    return None


def checked_instance(where, record: int, input_value, output_value, input_field: str, output_field: str) -> Instance:
    """An Instance from one record's raw values; a one-line SapoError naming `where`, the record and the field unless
    the input is a string and the output a reference or a non-empty list of references (see the module docstring)."""
    def bad(field, why):
        return SapoError(f"{where}: record {record} (counted from 0): \"{field}\" {why}")

    if not isinstance(input_value, str):
        raise bad(input_field, f"must be a string, got {_json_type(input_value)}")
    if encoding_problem(input_value):
        raise bad(input_field, encoding_problem(input_value))
    expected = "must be a string, a number or a non-empty list of them"
    if isinstance(output_value, list):
        if not output_value:
            raise bad(output_field, f"{expected}, got an empty list")
        outputs = [_reference(v) for v in output_value]
        if None in outputs:
            k = outputs.index(None)
            raise bad(output_field, f"{expected}, got {_json_type(output_value[k])} at position {k} of the list")
    else:
        outputs = [_reference(output_value)]
        if outputs[0] is None:
            raise bad(output_field, f"{expected}, got {_json_type(output_value)}")
    for k, output in enumerate(outputs):
        if encoding_problem(output):
            at = f" (position {k} of the list)" if isinstance(output_value, list) else ""
            raise bad(output_field, encoding_problem(output) + at)
    return Instance(input_value, tuple(outputs))


def _sapo_instances(path: Path) -> list[Instance]:
    records = read_json(path)
    if not isinstance(records, list):
        raise SapoError(f"{path} must hold a JSON list of {{\"sentence\", \"label\"}} records")
    instances = []
    for i, r in enumerate(records):
        if not isinstance(r, dict) or "sentence" not in r or "label" not in r:
            raise SapoError(f"{path}: record {i} (counted from 0) lacks \"sentence\" or \"label\"")
        instances.append(checked_instance(path, i, r["sentence"], r["label"], "sentence", "label"))
    return instances


def _optional_string(meta_path, task: str, entry: dict, key: str, default: str | None) -> str | None:
    """entry[key] when it is a string, `default` when it is absent or null, else a one-line error."""
    value = entry.get(key)
    if value is None:
        return default
    if not isinstance(value, str):
        raise SapoError(f"{meta_path}: entry {task}: \"{key}\" must be a string, got {_json_type(value)}")
    return value


def load_sapo_task(data_dir, name: str) -> Task:
    """A task from the SAPO/O-LoRA layout. A split file that is absent is recorded in `missing_splits`."""
    task_dir = resolve_task_dir(data_dir, name)
    full_name = task_dir.name
    meta_path = Path(data_dir) / "instructions.json"
    meta = read_json(meta_path)
    if full_name not in meta:
        raise SapoError(f"{meta_path} has no entry for task {full_name}")
    entry = meta[full_name]
    if not isinstance(entry, dict) or not isinstance(entry.get("instruction"), str):
        raise SapoError(f"{meta_path}: entry {full_name} lacks an \"instruction\" string (it may be empty)")
    suffix = _optional_string(meta_path, full_name, entry, "suffix", "")
    input_label = _optional_string(meta_path, full_name, entry, "input_label", None)
    if input_label is not None and not input_label.strip():
        raise SapoError(f"{meta_path}: entry {full_name}: \"input_label\" is empty (leave it out for the default)")
    labels = entry.get("labels") or []
    if not isinstance(labels, list) or not all(isinstance(w, str) for w in labels):
        raise SapoError(f"{meta_path}: entry {full_name}: \"labels\" must be a list of strings")
    for key, text in [("instruction", entry["instruction"]), ("suffix", suffix), ("input_label", input_label or ""),
                      *(("labels", w) for w in labels)]:
        if encoding_problem(text):
            raise SapoError(f"{meta_path}: entry {full_name}: \"{key}\" {encoding_problem(text)}")
    splits, missing = {}, []
    for split in SPLITS:
        path = task_dir / f"{split}.json"
        if path.exists():
            splits[split] = _sapo_instances(path)
        else:
            splits[split], missing = [], missing + [split]
    if len(missing) == len(SPLITS):
        raise SapoError(f"{task_dir} holds none of train.json, dev.json, test.json")
    return Task(name=full_name, instruction=entry["instruction"], suffix=suffix, label_words=tuple(labels),
                source=str(task_dir), missing_splits=tuple(missing), input_label=input_label, **splits)


def load_superni_file(path, n_test: int = 100, n_dev: int = 50) -> Task:
    """An original Super-NaturalInstructions task file (`Definition`, `Instances` with `input` and `output` list).

    Such a file has no splits: the first `n_test` instances are the test split (as in SuperNI's own evaluation), the
    next `n_dev` the dev split, the rest train. Label words are the distinct outputs of a task with few of them that
    also occur in the definition (classification tasks name their labels there).
    """
    data = read_json(path)
    if not isinstance(data, dict) or "Definition" not in data or "Instances" not in data:
        raise SapoError(f"{path} is not a Super-NaturalInstructions task file (needs \"Definition\" and \"Instances\")")
    definition = data["Definition"]
    instruction = " ".join(definition) if isinstance(definition, list) else str(definition)
    if encoding_problem(instruction):
        raise SapoError(f"{path}: \"Definition\" {encoding_problem(instruction)}")
    if not isinstance(data["Instances"], list):
        raise SapoError(f"{path}: \"Instances\" must be a list")
    instances = []
    for i, r in enumerate(data["Instances"]):
        if not isinstance(r, dict) or "input" not in r or "output" not in r:
            raise SapoError(f"{path}: record {i} (counted from 0) of \"Instances\" lacks \"input\" or \"output\"")
        instances.append(checked_instance(path, i, r["input"], r["output"], "input", "output"))
    if not instances:
        raise SapoError(f"{path} has no instances")
    labels = sorted({inst.label for inst in instances})
    label_words = tuple(w for w in labels if w in instruction) if len(labels) <= 10 else ()
    name = Path(path).stem
    return Task(name=name, instruction=instruction, label_words=label_words, source=str(path),
                test=instances[:n_test], dev=instances[n_test:n_test + n_dev], train=instances[n_test + n_dev:])


def load_hf_task(dataset: str, instruction: str | None = None, suffix: str = "", label_words=(),
                 input_column: str = "input", output_column: str = "output") -> Task:
    """A task from a Hugging Face dataset by name or local path (e.g. `Lots-of-LoRAs/task195_...`).

    Splits: train, valid/validation -> dev, test. `output` may be a string or a list of references. Without an
    explicit instruction the dataset's `definition` column (if any) is used.
    """
    import datasets

    try:
        ds = datasets.load_dataset(dataset)
    except Exception as e:  # datasets raises many types for "not found / no network"
        raise SapoError(f"cannot load dataset {dataset!r} ({type(e).__name__}): pass a local copy "
                        "(a directory of train/valid/test files) or a SAPO-layout --data-dir") from None
    split_names = {"train": ["train"], "dev": ["valid", "validation", "dev"], "test": ["test"]}
    splits, missing = {}, []
    for split, candidates in split_names.items():
        found = next((c for c in candidates if c in ds), None)
        if found is None:
            splits[split], missing = [], missing + [split]
            continue
        table = ds[found]
        for column in (input_column, output_column):
            if column not in table.column_names:
                raise SapoError(f"dataset {dataset!r} split {found} has no column {column!r} "
                                f"(columns: {', '.join(table.column_names)})")
        if instruction is None and "definition" in table.column_names and len(table):
            instruction = table[0]["definition"]
        where = f"dataset {dataset!r} split {found}"
        splits[split] = [checked_instance(where, i, r[input_column], r[output_column], input_column, output_column)
                         for i, r in enumerate(table)]
    if not instruction:
        raise SapoError(f"dataset {dataset!r} has no `definition` column: give the task instruction explicitly")
    name = dataset.rstrip("/").split("/")[-1]
    return Task(name=name, instruction=instruction, suffix=suffix, label_words=tuple(label_words), source=dataset,
                missing_splits=tuple(missing), **splits)


def load_task(name: str, data_dir=None, *, seed: int = 0, n_train: int = 1000, n_dev: int = 50,
              n_test: int = 100) -> Task:
    """A task by name: built-in when data_dir is None; else from a SAPO-layout directory, a SuperNI task file
    (`name` ends in .json), or a Hugging Face dataset (`hf:<dataset>`)."""
    if name.startswith("hf:"):
        return load_hf_task(name[3:])
    if name.endswith(".json"):
        return load_superni_file(name if data_dir is None else os.path.join(data_dir, name))
    if data_dir is None:
        from tasks.builtin import builtin_task

        return builtin_task(name, seed=seed, n_train=n_train, n_dev=n_dev, n_test=n_test)
    return load_sapo_task(data_dir, name)


def load_sequence(name: str, data_dir=None) -> Sequence:
    """A sequence by name: built-in (`demo`, `builtin`), a real-data one (`ni_seq_c1`, ... resolved against data_dir,
    preferring its `order/<name>/` folders), or a comma-separated list of task names."""
    if "," in name:
        return Sequence(name="custom", task_names=[t.strip() for t in name.split(",") if t.strip()], data_dir=data_dir)
    from tasks.builtin import BUILTIN_SEQUENCES, BUILTIN_TASK_NAMES  # here: real data needs no generated tasks

    if data_dir is None:
        if name in BUILTIN_SEQUENCES:
            return Sequence(name=name, task_names=list(BUILTIN_SEQUENCES[name]))
        if name in BUILTIN_TASK_NAMES:  # a single task is a sequence of one
            return Sequence(name=name, task_names=[name])
        if name in NAMED_SEQUENCES:
            raise SapoError(f"sequence {name!r} needs real data: pass --data-dir (e.g. ../shared/data/superni)")
        raise SapoError(f"unknown sequence {name!r}; built-in: {', '.join(BUILTIN_SEQUENCES)}; "
                        f"with --data-dir: {', '.join(NAMED_SEQUENCES)}")
    root = _check_dir(data_dir)
    order_dir = root / "order" / name
    if order_dir.is_dir():
        steps = sorted((p for p in order_dir.iterdir() if p.is_dir()), key=lambda p: int(p.name.split("-", 1)[0]))
        task_names = []
        for step in steps:
            trained = read_json(step / "train_tasks.json")
            if not trained or not isinstance(trained, list) or "dataset_name" not in trained[0]:
                raise SapoError(f"{step / 'train_tasks.json'} names no dataset_name")
            task_names.append(trained[0]["dataset_name"])
        return Sequence(name=name, task_names=task_names, data_dir=str(root))
    if name in NAMED_SEQUENCES:
        return Sequence(name=name, task_names=[resolve_task_dir(root, t).name for t in NAMED_SEQUENCES[name]],
                        data_dir=str(root))
    if name in BUILTIN_SEQUENCES:
        return Sequence(name=name, task_names=list(BUILTIN_SEQUENCES[name]))
    if any(p.is_dir() and (p.name == name or p.name.startswith(name + "_")) for p in root.iterdir()):
        return Sequence(name=name, task_names=[resolve_task_dir(root, name).name], data_dir=str(root))
    raise SapoError(f"unknown sequence {name!r}: no {order_dir}, no such task, and not one of "
                    f"{', '.join(NAMED_SEQUENCES)}")
