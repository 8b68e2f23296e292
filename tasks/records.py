"""Records read back from disk, checked for shape: the one validator every reader of a run file uses.

A record is a dataclass (selection.json's TaskSelection, training.json's Training, scores.json's Row, a checkpoint's
step, a score-cache entry, ...). `from_record(cls, data, where)` builds it from parsed JSON and checks, against the
dataclass's own annotations, that the object has every required key, no unknown one, and values of the annotated
types (nested records and lists of them included). A damaged file that is valid JSON but of the wrong shape is then
one line naming the file and what is wrong, with the same advice as for malformed JSON (`read_record`), instead of
a KeyError or TypeError deep inside a resume.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from pathlib import Path

from tasks.errors import SapoError


class ShapeError(Exception):
    """What is wrong with a record, and where inside it (a key path such as candidates[2].score)."""


def _json_type(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return {dict: "an object", list: "a list", str: "a string", int: "an integer", float: "a number"}.get(
        type(value), type(value).__name__)


@functools.lru_cache(maxsize=None)
def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def _describe(tp) -> str:
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp) or typing.is_typeddict(tp):
        return "an object"
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if origin is list:
        return "a list"
    if origin is dict or tp is dict:
        return "an object"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(tp, str(tp))


def _key(path: str, key) -> str:
    return f"{path}.{key}" if path else str(key)


def _convert(value, tp, path: str, undefined_floats: bool):
    """`value` checked against the annotation `tp` (records built where `tp` is a dataclass)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is type(None):
                continue
            try:
                return _convert(value, option, path, undefined_floats)
            except ShapeError:
                if len(options) == 2 or dataclasses.is_dataclass(option):
                    raise
        raise ShapeError(f"{path} must be {_describe(tp)}, got {_json_type(value)}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        return _build(tp, value, path, undefined_floats)
    if typing.is_typeddict(tp):  # a record kept as a plain dict (e.g. a row's scores of one task)
        if not isinstance(value, dict):
            raise ShapeError(f"{path} must be an object, got {_json_type(value)}")
        hints = _hints(tp)
        unknown = [k for k in value if k not in hints]
        missing = [k for k in hints if k in tp.__required_keys__ and k not in value]  # in declaration order
        if unknown or missing:
            raise ShapeError(f"unexpected key {_key(path, unknown[0])}" if unknown else
                             f"missing key {_key(path, missing[0])}")
        return {k: _convert(v, hints[k], _key(path, k), undefined_floats) for k, v in value.items()}
    if origin is list:
        if not isinstance(value, list):
            raise ShapeError(f"{path} must be a list, got {_json_type(value)}")
        (item,) = typing.get_args(tp) or (typing.Any,)
        return [_convert(v, item, f"{path}[{i}]", undefined_floats) for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ShapeError(f"{path} must be an object, got {_json_type(value)}")
        _, item = typing.get_args(tp) or (str, typing.Any)
        return {k: _convert(v, item, _key(path, k), undefined_floats) for k, v in value.items()}
    if tp is typing.Any:
        return value
    if tp is float:
        if value is None and undefined_floats:  # written as null where a number is undefined (strict JSON)
            return float("nan")
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not undefined_floats and not math.isfinite(value):
                raise ShapeError(f"{path} must be a finite number, got {value}")
            return value  # an int stays an int: JSON does not tell 2 from 2.0
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is bool or tp is str:
        if isinstance(value, tp):
            return value
    else:
        raise TypeError(f"records: no check for the annotation {tp!r} at {path}")
    raise ShapeError(f"{path} must be {_describe(tp)}, got {_json_type(value)}")


def _build(cls, data, path: str, undefined_floats: bool):
    if not isinstance(data, dict):
        raise ShapeError(f"{path or 'the record'} must be an object, got {_json_type(data)}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in data if k not in fields]
    if unknown:
        raise ShapeError(f"unexpected key {_key(path, unknown[0])}")
    missing = [name for name, f in fields.items() if name not in data and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ShapeError(f"missing key {_key(path, missing[0])}")
    hints = _hints(cls)
    return cls(**{k: _convert(v, hints[k], _key(path, k), undefined_floats) for k, v in data.items()})


def from_record(cls, data, where, *, undefined_floats: bool = False, advice: str = "", inside: str = ""):
    """`cls` (a record dataclass, or an annotation such as dict[str, Entry] or list[Entry]) built from the parsed
    JSON `data`; a one-line SapoError naming `where` (the file) and what is wrong. `undefined_floats`: null (and NaN)
    stand for an undefined number (a correlation of constant columns) and are read as NaN; otherwise every number
    must be finite. `inside`: where `data` sits in the file (a key), for the message."""
    try:
        return _convert(data, cls, inside, undefined_floats)
    except ShapeError as e:
        advice = f"; {advice}" if advice else ""
        raise SapoError(f"{where} is not a valid {Path(str(where)).name} record: {e}{advice}") from None


_NO_DEFAULT = object()


def read_record(path, cls, *, default=_NO_DEFAULT, advice: str = "", undefined_floats: bool = False):
    """The record of type `cls` in the JSON file `path` (`default` when the file does not exist). Malformed JSON and a
    wrong shape are both one line naming the file, with `advice` (what to do about the damaged file)."""
    from tasks.loaders import read_json

    if default is not _NO_DEFAULT and not Path(path).exists():
        return default
    data = read_json(path, advice=advice)
    return from_record(cls, data, path, undefined_floats=undefined_floats, advice=advice)


def json_safe(obj):
    """Non-finite floats -> null, for records whose numbers may be undefined (read back with undefined_floats)."""
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return None if isinstance(obj, float) and not math.isfinite(obj) else obj
