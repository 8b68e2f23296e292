"""A run directory: one process tree at a time (a lock), and a key that says what its results were made from.

Every result in a run directory (selections, adapters, rows of R, predictions) depends on the config, on the data of
every task, on the candidate pools and on the base model. config.json records all four as the run's key: a rerun
resumes only when its own key matches, and otherwise stops with one line saying what changed, so that one R is never
built from two versions of the data or two configs. The directory's own path is not part of the key: a run moved,
copied, or named by another (relative) path resumes.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TypedDict

from tasks.errors import SapoError, describe_os_error, release_at_main_exit, writing, writing_under
from tasks.loaders import read_json, write_json
from tasks.records import from_record

CONFIG_FILE = "config.json"
KEY_FIELD = "run_key"  # config.json: the Config's fields, plus this entry
LOCK_FILE = ".lock"
NOT_WORK = {CONFIG_FILE, LOCK_FILE}  # a directory holding only these has no results (e.g. a start that failed)


def text_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass
class RunKey:
    """What a run's results are made from. `config`: the config's fields that change results (paths of inputs left
    out: their content is compared instead); `tasks`: (name, Task.content_hash()) in sequence order; `pools`: task ->
    hash of its candidate pool (tasks whose pool is generated during the run are not listed: the config's generation
    fields and the run's own paraphrases.json decide it); `model`: the base model (+ adapters --model names) by
    content (tasks.score_cache.model_state_id)."""

    config: dict
    tasks: list[list[str]]
    pools: dict[str, str]
    model: str
    model_name: str = ""  # --model as given, for messages only (the same model under another path resumes)

    def to_json(self) -> dict:
        return {"tasks": self.tasks, "pools": self.pools, "model": self.model, "model_name": self.model_name}

    def differences(self, saved_config: dict, saved_key: dict) -> list[str]:
        """What differs from a saved run, in words; empty when the run may resume."""
        found = []
        changed = sorted(k for k in set(saved_config) | set(self.config)
                         if k != KEY_FIELD and saved_config.get(k) != self.config.get(k))
        if changed:
            found.append(f"another config ({', '.join(changed)} differ)")
        saved_tasks = dict(map(tuple, saved_key.get("tasks", [])))
        if [name for name, _ in saved_key.get("tasks", [])] != [name for name, _ in self.tasks]:
            found.append(f"another task sequence ({','.join(saved_tasks)} -> {','.join(n for n, _ in self.tasks)})")
        else:
            found += [f"other data for task {name}" for name, h in self.tasks if saved_tasks[name] != h]
        saved_pools = saved_key.get("pools", {})
        found += [f"another candidate pool for task {name}" for name in sorted(set(saved_pools) | set(self.pools))
                  if saved_pools.get(name) != self.pools.get(name)]
        if saved_key.get("model") != self.model:
            before = saved_key.get("model_name", "")
            found.append(f"another model ({before} -> {self.model_name})" if before != self.model_name else
                         f"another model (the files or adapters of {self.model_name} changed)")
        return found


def has_work(run_dir: Path) -> bool:
    """Whether `run_dir` holds anything a run computed (a failed start leaves only config.json)."""
    return run_dir.is_dir() and any(p.name not in NOT_WORK for p in run_dir.iterdir())


class RunLock:
    """An exclusive flock on run_dir/.lock. The OS drops it when the process dies (kill -9 included), so a lock left
    behind by a crash never blocks the rerun; a second live run on the same directory is refused."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / LOCK_FILE
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = self.path.read_text().strip() or "another process"
            os.close(self.fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise SapoError(f"{run_dir} is in use by another run ({holder}); wait for it to end, or use another "
                                "--output-dir") from None
            raise
        release_at_main_exit(self.release)
        os.ftruncate(self.fd, 0)
        with writing(self.path):
            os.write(self.fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())

    def release(self):
        if self.fd is not None:
            os.close(self.fd)  # closing the last descriptor releases the flock
            self.fd = None


def move_aside(run_dir: Path) -> Path:
    """Move everything but the lock into a sibling `<name>.old-<time>` (the lock stays held on the run dir)."""
    backup = run_dir.with_name(run_dir.name + time.strftime(".old-%Y%m%d-%H%M%S"))
    backup.mkdir()
    for entry in run_dir.iterdir():
        if entry.name != LOCK_FILE:
            os.replace(entry, backup / entry.name)
    return backup


def open_run_dir(run_dir: Path, config: dict, key: RunKey, overwrite: bool) -> str | None:
    """Lock `run_dir` (created if needed) and check that what it holds was made with `key`; write config.json.
    Returns a message to print (the old run moved aside), or raises a one-line SapoError."""
    if run_dir.exists() and not run_dir.is_dir():
        raise SapoError(f"--output-dir {run_dir} is a file, not a directory")
    run_dir.mkdir(parents=True, exist_ok=True)
    writing_under(run_dir)
    RunLock(run_dir)
    saved = read_config(run_dir)
    note = None
    if has_work(run_dir):
        if saved is None:
            problem = f"results but no {CONFIG_FILE} (what they were made with is unknown)"
        elif KEY_FIELD not in saved:
            problem = f"a run without a data key in its {CONFIG_FILE} (written by an older train_sapo)"
        else:
            reasons = key.differences({k: v for k, v in saved.items() if k in key.config}, saved[KEY_FIELD])
            problem = f"a run with {'; '.join(reasons)}" if reasons else None
        if problem and not overwrite:
            raise SapoError(f"{run_dir} holds {problem}; use another --output-dir, or --overwrite to move the old "
                            "run aside and start afresh")
        if problem:
            note = f"moved the earlier run to {move_aside(run_dir)}"
    with writing(run_dir / CONFIG_FILE):
        write_json(run_dir / CONFIG_FILE, {**config, KEY_FIELD: key.to_json()})
    return note


def open_run_dir_on_every_process(run_dir: Path, config: dict, key: RunKey, overwrite: bool, accelerator) -> Path:
    """open_run_dir by the main process only (it takes the lock: one launch is one run); every process gets its
    verdict, so a refusal ends all of them with the same line."""
    from accelerate.utils import broadcast_object_list

    outcome = [None]
    if accelerator.is_main_process:
        try:
            outcome = [("ok", open_run_dir(run_dir, config, key, overwrite))]
        except SapoError as e:
            outcome = [("error", str(e))]
        except OSError as e:  # a read-only or unwritable place, a file in the way: one line naming the path
            outcome = [("error", describe_os_error(e))]
    if accelerator.num_processes > 1:
        broadcast_object_list(outcome)
    verdict, message = outcome[0]
    if verdict == "error":
        raise SapoError(message)
    if message:
        accelerator.print(message)
    return run_dir


class SavedKey(TypedDict):
    """config.json's run_key entry, as RunKey.to_json writes it."""

    tasks: list[list[str]]
    pools: dict[str, str]
    model: str
    model_name: str


def read_config(run_dir: Path) -> dict | None:
    """config.json: the run's config values (compared as they are) and its key, checked for shape."""
    path = run_dir / CONFIG_FILE
    advice = "restore it, or use another --output-dir"
    saved = read_json(path, default=None, advice=advice)
    if saved is not None and not isinstance(saved, dict):
        raise SapoError(f"{path} is not a JSON object; {advice}")
    if saved is not None and KEY_FIELD in saved:
        from_record(SavedKey, saved[KEY_FIELD], path, advice=advice, inside=KEY_FIELD)
        if any(len(pair) != 2 for pair in saved[KEY_FIELD]["tasks"]):
            raise SapoError(f"{path} is not a valid {CONFIG_FILE} record: {KEY_FIELD}.tasks must hold [name, hash] "
                            f"pairs; {advice}")
    return saved


def check_writable_file(path, flag: str):
    """Fail now, before any work, when `path` cannot be written: a directory there, a file where a parent directory
    should be, a read-only or unwritable directory."""
    path = Path(path)
    if path.is_dir():
        raise SapoError(f"{flag} {path} is a directory")
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise SapoError(f"{flag} {path}: {parent} is a file, not a directory")
    probe = parent / f".{path.name}.write-test-{os.getpid()}"
    try:
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise SapoError(f"{flag} {path} cannot be written: {parent}: {e.strerror}") from None


def pool_hash(pool: list[str]) -> str:
    return text_hash(json.dumps(pool))


def check_task_folders(task_dirs: list[Path]):
    """Finished work must be a prefix of the loop. A task's adapter without its selection.json (the instruction it
    was trained with) or training.json, or a task without its adapter while a later task has results (trained on top
    of the missing one), cannot be resumed without mixing two histories: one line naming the missing file. A missing
    scores.json (a row of R) is recomputed from the saved state, and a missing last adapter is retrained."""
    for k, task_dir in enumerate(task_dirs):
        trained = (task_dir / "adapter" / "adapter_config.json").exists()
        for name in ("selection.json", "training.json"):
            if trained and not (task_dir / name).exists():
                raise SapoError(f"{task_dir / name} is missing but the task's adapter is trained: restore the file, "
                                f"or delete {task_dir} and every later task folder to redo them")
        later = [d for d in task_dirs[k + 1:] if d.is_dir() and any(p.name != "checkpoint" for p in d.iterdir())]
        if not trained and later:
            raise SapoError(f"{task_dir / 'adapter'} is missing but {later[0]} holds results trained on top of it: "
                            f"restore it, or delete {task_dir} and every later task folder to redo them")
