"""What a task, an instance and a sequence are. Everything else in the project speaks in these three types."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

from tasks.errors import SapoError
from tasks.prompts import DEFAULT_INPUT_LABEL, input_label_for


@dataclass(frozen=True)
class Instance:
    """One example: the input text and one or more reference outputs (the first is the training label)."""

    input: str
    outputs: tuple[str, ...]

    def __post_init__(self):
        if isinstance(self.outputs, str):
            object.__setattr__(self, "outputs", (self.outputs,))
        else:
            object.__setattr__(self, "outputs", tuple(self.outputs))
        if not self.outputs:
            raise SapoError(f"instance has no reference output: {self.input[:60]!r}")

    @property
    def label(self) -> str:
        return self.outputs[0]


SPLITS = ("train", "dev", "test")


@dataclass
class Task:
    """A task: its original instruction (candidate 0), a fixed answer-format suffix, label words, and splits.

    `label_words` are the words every paraphrase must keep verbatim (classification labels); empty for generation.
    `paraphrases` is an optional built-in pool of hand-written rewrites of `instruction`.
    `instruction` may be empty (TRACE's Py150 has none: such a task is trained without selection).
    `input_label` is the line before the input text in the prompt; None picks it from the original instruction
    ("文本:" for a Chinese one, else "Text:"), and it then stays the same for every candidate instruction.
    """

    name: str
    instruction: str
    suffix: str = ""
    label_words: tuple[str, ...] = ()
    train: list[Instance] = field(default_factory=list)
    dev: list[Instance] = field(default_factory=list)
    test: list[Instance] = field(default_factory=list)
    paraphrases: tuple[str, ...] = ()
    source: str = ""  # where the data came from, for messages and run records
    missing_splits: tuple[str, ...] = ()  # splits the source does not have (reported, never silently filled)
    input_label: str | None = None

    def __post_init__(self):
        if self.input_label is None:
            self.input_label = input_label_for(self.instruction)

    def split(self, name: str) -> list[Instance]:
        """The instances of split `name`; a clear error if the source does not have it or it is empty."""
        if name not in SPLITS:
            raise SapoError(f"unknown split {name!r} (expected one of {', '.join(SPLITS)})")
        if name in self.missing_splits:
            raise SapoError(f"task {self.name} has no {name} split in {self.source or 'its source'}")
        instances = getattr(self, name)
        if not instances:
            raise SapoError(f"task {self.name}: the {name} split of {self.source or 'its source'} is empty")
        return instances

    def content_hash(self) -> str:
        """Hash of everything that defines the task's data (for caches keyed on content, not on a file path)."""
        h = hashlib.sha256()
        header = [self.name, self.instruction, self.suffix, list(self.label_words)]
        if self.input_label != DEFAULT_INPUT_LABEL:  # only then: the hashes of tasks that predate the field stay
            header.append(self.input_label)
        if len(self.suffix) < 2:  # its prompts changed with the authors' suffix rule (prompts.suffix_separator)
            header.append("suffix-separator-v2")
        h.update(json.dumps(header).encode())
        for split in SPLITS:
            for inst in getattr(self, split):
                h.update(json.dumps([split, inst.input, list(inst.outputs)]).encode())
        return h.hexdigest()[:16]


@dataclass
class Sequence:
    """An ordered continual-learning sequence: task names, and where their data comes from (`builtin` or a dir)."""

    name: str
    task_names: list[str]
    data_dir: str | None = None  # None: the built-in tasks


def instances_hash(instances: list[Instance]) -> str:
    h = hashlib.sha256()
    for inst in instances:
        h.update(json.dumps([inst.input, list(inst.outputs)]).encode())
    return h.hexdigest()[:16]
