"""Paraphrase generation: rewrites of a task's ORIGINAL instruction by a chat model (local, or an OpenAI-compatible
endpoint), parsed and validated before they may become candidates.

As in the authors' code: temperature 0.6, always rewritten from the original (never from an earlier rewrite), a
meta-prompt that asks for the same task in another style, keeping the label words exactly, wrapped in
<START>...</START>. Unlike it, a failed or unparsable reply never becomes a candidate.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from typing import TypedDict

import torch

from tasks.candidates import candidate_problem, filter_candidates, required_label_words
from tasks.errors import SapoError
from tasks.loaders import write_json
from tasks.records import read_record

PARAPHRASE_VERSION = "sapo-paraphrase-v1"


class ParaphraseEntry(TypedDict):
    """paraphrases.json: one cached generation (key: the task's content and the paraphraser)."""

    task: str
    paraphraser: str
    temperature: float
    seed: int
    paraphrases: list[str]


def read_paraphrase_cache(path) -> dict[str, ParaphraseEntry]:
    return read_record(path, dict[str, ParaphraseEntry], default={},
                       advice="delete it to generate the paraphrases again")


def meta_prompt(task) -> str:
    """Our request for one rewrite of the ORIGINAL instruction (built by concatenation: it may hold braces)."""
    labels = required_label_words(task)
    keep = ""
    if labels:
        keep = ("It must keep these label words exactly as written, with the same spelling and the same upper and "
                "lower case: " + ", ".join('"' + w + '"' for w in labels) + ". ")
    return ("Here is the instruction of a task given to an assistant:\n\n" + task.instruction + "\n\n"
            "Write a new instruction that asks for exactly the same task and the same kind of answer, but in a "
            "different style, structure or tone. " + keep +
            "Do not add examples, do not answer the task, and do not say that the text was rewritten or "
            "reworded. Put the new instruction, and nothing else, between <START> and </START>.")


_TAGGED = re.compile(r"<START>(.*?)</START>", re.DOTALL)
_META_WORDS = re.compile(r"paraphras|rewrit|reword|rephras|<START>|</START>", re.IGNORECASE)


def parse_paraphrase(text: str, task=None) -> tuple[str | None, str | None]:
    """(candidate, None) from one model reply, or (None, why it was rejected). The reply must hold <START>...</START>;
    a candidate that talks about being a paraphrase is rejected; with a task, it must also be a valid candidate
    (label words kept verbatim, sane length: tasks.candidates)."""
    match = _TAGGED.search(text or "")
    if match is None:
        return None, "has no <START>...</START>"
    candidate = match.group(1).strip()
    if not candidate:
        return None, "is empty"
    if _META_WORDS.search(candidate) and not _META_WORDS.search(task.instruction if task else ""):
        return None, "mentions paraphrasing"
    if task is not None:
        problem = candidate_problem(task, candidate)
        if problem:
            return None, problem
    return candidate, None


def sample_local(model, tokenizer, prompt: str, n: int, temperature: float, seed: int) -> list[str]:
    from tasks.prompts import render_chat

    text = render_chat(tokenizer, [{"role": "user", "content": prompt}], True)
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"].to(model.device)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    torch.manual_seed(seed)
    with torch.inference_mode():  # plain sampling at `temperature`, as from the original's API (no top-k/top-p)
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=temperature,
                             top_p=1.0, top_k=0, num_return_sequences=n,
                             max_new_tokens=_max_new_tokens(tokenizer, prompt), pad_token_id=pad_id)
    return tokenizer.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)


def _max_new_tokens(tokenizer, prompt) -> int:
    # A valid candidate has at most 4x the original's characters (tasks.candidates); the prompt holds it once.
    return min(1024, 4 * len(tokenizer(prompt, add_special_tokens=False)["input_ids"]) // 3 + 64)


def chat_api(url: str, model_name: str, prompt: str, temperature: float, timeout: float = 120.0) -> str:
    """One reply from an OpenAI-compatible /v1/chat/completions endpoint (standard library only).
    The key comes from SAPO_API_KEY or OPENAI_API_KEY (none is sent when neither is set: local servers)."""
    import urllib.error
    import urllib.request

    if not url.rstrip("/").endswith("/chat/completions"):
        url = url.rstrip("/") + ("/chat/completions" if url.rstrip("/").endswith("/v1") else "/v1/chat/completions")
    body = json.dumps({"model": model_name, "temperature": temperature,
                       "messages": [{"role": "user", "content": prompt}]}).encode()
    headers = {"Content-Type": "application/json"}
    key = os.environ.get("SAPO_API_KEY") or os.environ.get("OPENAI_API_KEY")
    if key:
        headers["Authorization"] = "Bearer " + key
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            data = json.loads(response.read().decode("utf-8"))
    except urllib.error.HTTPError as e:
        detail = e.read().decode("utf-8", "replace")[:200].replace("\n", " ")
        raise SapoError(f"paraphrase API {url} answered HTTP {e.code}: {detail}") from None
    except (urllib.error.URLError, TimeoutError, OSError) as e:
        raise SapoError(f"paraphrase API {url} unreachable: {getattr(e, 'reason', e)}") from None
    except json.JSONDecodeError:
        raise SapoError(f"paraphrase API {url} did not answer JSON") from None
    try:
        return data["choices"][0]["message"]["content"] or ""
    except (KeyError, IndexError, TypeError):
        raise SapoError(f"paraphrase API {url} answered without choices[0].message.content") from None


def generate_paraphrases(task, k, model, tokenizer, *, temperature=0.6, max_tries=5, seed=0, cache_path=None,
                         api_url=None, api_model=None, paraphraser_id=None) -> list[str]:
    """`k` valid, distinct paraphrases of the task's ORIGINAL instruction (the original itself not included).

    Each round asks for the missing number of rewrites (all from the original, never from an earlier rewrite),
    parses and validates them (tasks.candidates.filter_candidates: label words kept, distinct, sane length); after
    `max_tries` rounds without k valid ones it raises a SapoError (a failed generation never becomes a candidate).
    With `api_url` the replies come from an OpenAI-compatible chat API (`api_model`), else from the local `model`.
    Results are cached in `cache_path` (JSON) under the task's content and the paraphraser; a rerun reuses them.
    """
    if k <= 0:
        return []
    who = paraphraser_id or api_model or getattr(getattr(model, "config", None), "_name_or_path", "") or "local"
    key = hashlib.sha256(json.dumps([PARAPHRASE_VERSION, task.name, task.instruction, list(task.label_words),
                                     who, temperature, seed]).encode()).hexdigest()[:24]
    cache = read_paraphrase_cache(cache_path) if cache_path else {}
    stored = cache.get(key, {}).get("paraphrases", [])
    pool, _ = filter_candidates(task, list(stored))
    prompt = meta_prompt(task)
    rejected: list[tuple[str, str]] = []
    for attempt in range(max_tries):
        if len(pool) - 1 >= k:
            break
        need = k - (len(pool) - 1)
        if api_url:
            replies = [chat_api(api_url, api_model, prompt, temperature) for _ in range(need)]
        else:
            replies = sample_local(model, tokenizer, prompt, need, temperature, seed * 1000 + attempt)
        parsed = []
        for reply in replies:
            candidate, problem = parse_paraphrase(reply, task)
            if problem:
                rejected.append((reply, problem))
            else:
                parsed.append(candidate)
        pool, bad = filter_candidates(task, pool[1:] + parsed)  # duplicates of the original or of each other
        rejected += bad
    paraphrases = pool[1:k + 1]
    if cache_path and paraphrases:
        cache = read_paraphrase_cache(cache_path)
        cache[key] = {"task": task.name, "paraphraser": who, "temperature": temperature, "seed": seed,
                      "paraphrases": pool[1:]}
        write_json(cache_path, cache)
    if len(paraphrases) < k:
        reasons = sorted({p for _, p in rejected})
        raise SapoError(f"paraphrase generation for task {task.name} gave {len(paraphrases)} valid of {k} after "
                        f"{max_tries} rounds (rejected replies: {'; '.join(reasons)[:200] or 'none'}); use a "
                        "stronger --paraphraser, --paraphrase-api, or --candidates FILE")
    return paraphrases
