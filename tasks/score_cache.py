"""Keys of the score cache: what a score depends on, hashed. A rerun (or a run interrupted half way) recomputes only
the scores whose key is not stored yet; a changed model state, task, candidate, instance set or length is a new key.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TypedDict

SCORE_VERSION = "sapo-score-v1"  # part of every cache key: bump it when the score's definition changes


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


HASH_CONTENT_BELOW = 64 << 20  # files of the base model smaller than this are hashed by content, larger ones by stat


def model_state_id(model_arg_or_path, adapter_dirs=()) -> str:
    """Content hash of a model state (base + adapters in order), for cache keys.

    The base is identified by its hub id, or for a local directory by its path and its files: configs, tokenizer and
    chat template by content (they change the score), multi-GB weight shards by name, size and mtime (hashing 16 GB
    per run would cost more than the scoring). Adapters are small, their files are hashed by content, so retraining an
    adapter in place gives a new state id.
    """
    h = hashlib.sha256()
    base = Path(str(model_arg_or_path))
    if base.is_dir():
        h.update(b"dir:" + str(base.resolve()).encode())
        for f in sorted(p for p in base.rglob("*") if p.is_file() and ".cache" not in p.parts):
            st = f.stat()
            rel = str(f.relative_to(base)).encode()
            if st.st_size < HASH_CONTENT_BELOW:
                h.update(rel + b":" + _sha256_file(f).encode())
            else:
                h.update(rel + f":{st.st_size}:{st.st_mtime_ns}".encode())
    else:
        h.update(b"hub:" + str(model_arg_or_path).encode())
    for adapter in adapter_dirs:
        h.update(b"|adapter")
        adapter = Path(adapter)
        for f in sorted(p for p in adapter.rglob("*") if p.is_file()):
            if f.suffix in (".safetensors", ".bin", ".json", ".pt"):
                h.update(str(f.relative_to(adapter)).encode() + b":" + _sha256_file(f).encode())
    return h.hexdigest()[:16]


class CacheEntry(TypedDict):
    """One cached score: a candidate's per-instance sums and counts of response-token NLL."""

    task: str
    instruction: str
    state_id: str
    instance_sums: list[float]
    instance_counts: list[int]
    seconds: float


def read_score_cache(path) -> dict[str, CacheEntry]:
    """The score cache in `path` ({} when absent), checked for shape: one line naming the file when damaged."""
    from tasks.records import read_record

    return read_record(path, dict[str, CacheEntry], default={}, advice="delete it to score again")


def cached_entries(cache_path, keys: list[str], num_instances: int, is_main: bool = True,
                   world: int = 1) -> dict[int, CacheEntry]:
    """Position in `keys` -> the cached entry of that key, for the keys whose entry covers all `num_instances`
    instances. Every process must skip the same candidates: the main process reads the file, and under several
    processes (`world` > 1, every process calling) its view is broadcast to the others."""
    cache = read_score_cache(cache_path) if cache_path and is_main else {}
    if world > 1:
        from accelerate.utils import broadcast_object_list

        shared = [{k: cache[k] for k in keys if k in cache}]
        broadcast_object_list(shared)
        cache = shared[0]
    found = {}
    for position, key in enumerate(keys):
        entry = cache.get(key)
        if entry and len(entry.get("instance_sums", ())) == num_instances:
            found[position] = entry
    return found


def merge_into_cache(cache_path, entries: dict[str, CacheEntry]):
    """`entries` added to the cache as it is on disk now (another run may have added entries since it was read),
    the file replaced atomically."""
    from tasks.loaders import write_json

    cache = read_score_cache(cache_path)
    cache.update(entries)
    write_json(cache_path, cache)


def score_key(state_id, task_hash, instruction, inst_hash, max_length) -> str:
    text = json.dumps([SCORE_VERSION, state_id, task_hash, instruction, inst_hash, max_length])
    return hashlib.sha256(text.encode()).hexdigest()[:24]
