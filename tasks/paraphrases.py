"""Paraphrase generation: rewrites of a task's ORIGINAL instruction by a chat model (local, or an OpenAI-compatible
endpoint), parsed and validated before they may become candidates.

As in the authors' code: temperature 0.6, always rewritten from the original (never from an earlier rewrite), a
meta-prompt that asks for the same task in another style, keeping the label words exactly, wrapped in
<START>...</START>. Unlike it, a failed or unparsable reply never becomes a candidate.

The meta-prompt (ours: the authors' is English only) is a user's file (`--meta-prompt FILE`) when given, else a
built-in one in the task's language: Chinese for a task whose original instruction is Chinese (holds Han characters,
the rule that gives it the "文本:" input label), English otherwise. A file is UTF-8 text holding the placeholder
{instruction} exactly once and {label_words} at most once (the label words a rewrite must keep, quoted and
comma-separated, or nothing when the task has none). Both are put in by splitting the text at them, never by
str.format, so the file and the instruction may hold any other braces. The file must ask for the <START>...</START>
wrapping that replies are parsed by. paraphrases.json records, per task, how many replies each validity filter
rejected (tasks.candidates.REJECTION_FILTERS).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from tasks.candidates import candidate_problem, filter_candidates, rejection_filter, required_label_words
from tasks.errors import SapoError
from tasks.loaders import read_json, write_json
from tasks.prompts import HAN_CHARACTERS

PARAPHRASE_VERSION = "sapo-paraphrase-v1"
INSTRUCTION_PLACEHOLDER = "{instruction}"
LABELS_PLACEHOLDER = "{label_words}"
_PLACEHOLDERS = re.compile("(" + re.escape(INSTRUCTION_PLACEHOLDER) + "|" + re.escape(LABELS_PLACEHOLDER) + ")")
_HAN = re.compile(f"[{HAN_CHARACTERS}]")


def _fill(template: str, values: dict[str, str]) -> str:
    """`template` with each placeholder replaced by its value: split at the placeholders, so the values (user text)
    are never scanned for placeholders or braces."""
    return "".join(values.get(part, part) for part in _PLACEHOLDERS.split(template))


@dataclass(frozen=True)
class MetaPrompt:
    """A request for one rewrite: `template` holds INSTRUCTION_PLACEHOLDER once and LABELS_PLACEHOLDER at most once.
    `keep_sentence` (built-in ones) is what LABELS_PLACEHOLDER becomes when the task has label words to keep (it holds
    LABELS_PLACEHOLDER itself); without it the placeholder becomes the quoted words. `source` names it in
    paraphrases.json; `cache_id` goes into the paraphrase cache key (None for the built-in English one, whose keys
    predate the choice of meta-prompt)."""

    template: str
    source: str
    cache_id: str | None = None
    keep_sentence: str = ""

    def render(self, task) -> str:
        words = ", ".join('"' + w + '"' for w in required_label_words(task))
        labels = words if not self.keep_sentence else (_fill(self.keep_sentence, {LABELS_PLACEHOLDER: words})
                                                       if words else "")
        return _fill(self.template, {INSTRUCTION_PLACEHOLDER: task.instruction, LABELS_PLACEHOLDER: labels})


ENGLISH = MetaPrompt(
    "Here is the instruction of a task given to an assistant:\n\n" + INSTRUCTION_PLACEHOLDER + "\n\n"
    "Write a new instruction that asks for exactly the same task and the same kind of answer, but in a different "
    "style, structure or tone. " + LABELS_PLACEHOLDER + "Do not add examples, do not answer the task, and do not say "
    "that the text was rewritten or reworded. Put the new instruction, and nothing else, between <START> and </START>.",
    "built-in English",
    keep_sentence="It must keep these label words exactly as written, with the same spelling and the same upper and "
                  "lower case: " + LABELS_PLACEHOLDER + ". ")
# Ours, in our own words: the same request in Chinese, for tasks whose instruction is Chinese (TRACE's C-STANCE).
CHINESE = MetaPrompt(
    "下面是交给助手的一个任务的指令：\n\n" + INSTRUCTION_PLACEHOLDER + "\n\n"
    "请用中文另写一条指令，要求完成完全相同的任务、给出同一种形式的答案，但换一种风格、结构或语气。" + LABELS_PLACEHOLDER +
    "不要举例，不要回答这个任务，也不要说明这条指令是改写或转述得来的。只把新指令放在 <START> 和 </START> 之间，"
    "不要输出其他任何内容。",
    "built-in Chinese", "builtin-zh-v1",
    keep_sentence="必须原样保留这些标签词，拼写和大小写完全一致：" + LABELS_PLACEHOLDER + "。")


def builtin_meta_prompt(task) -> MetaPrompt:
    """The built-in meta-prompt in the task's language: Chinese when its original instruction is Chinese."""
    return CHINESE if _HAN.search(task.instruction) else ENGLISH


def read_meta_prompt(path) -> MetaPrompt:
    """A user's meta-prompt file, checked (before any model loads): one clear error naming the file if unusable."""
    try:
        template = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SapoError(f"--meta-prompt: file not found: {path}") from None
    except UnicodeDecodeError:
        raise SapoError(f"--meta-prompt {path}: not UTF-8 text") from None
    except OSError as e:
        raise SapoError(f"--meta-prompt {path}: cannot read it: {e.strerror or e}") from None
    count = template.count(INSTRUCTION_PLACEHOLDER)
    if count != 1:
        raise SapoError(f"--meta-prompt {path}: must hold the placeholder {INSTRUCTION_PLACEHOLDER} exactly once "
                        f"(where the original instruction goes); it holds it {count} times")
    if template.count(LABELS_PLACEHOLDER) > 1:
        raise SapoError(f"--meta-prompt {path}: holds {LABELS_PLACEHOLDER} more than once")
    if "<START>" not in template or "</START>" not in template:
        raise SapoError(f"--meta-prompt {path}: must ask for the new instruction between <START> and </START> "
                        "(replies are parsed by those tags)")
    return MetaPrompt(template, str(path), "file:" + hashlib.sha256(template.encode()).hexdigest()[:16])


def meta_prompt(task, custom: MetaPrompt | None = None) -> str:
    """Our request for one rewrite of the task's ORIGINAL instruction: `custom` (a user's file) or the built-in one
    in the task's language."""
    return (custom or builtin_meta_prompt(task)).render(task)


_TAGGED = re.compile(r"<START>(.*?)</START>", re.DOTALL)
_META_WORDS = re.compile(r"paraphras|rewrit|reword|rephras|<START>|</START>|改写|转述|重写|复述", re.IGNORECASE)


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
                         api_url=None, api_model=None, paraphraser_id=None, custom_meta_prompt=None) -> list[str]:
    """`k` valid, distinct paraphrases of the task's ORIGINAL instruction (the original itself not included).

    Each round asks for the missing number of rewrites (all from the original, never from an earlier rewrite),
    parses and validates them (tasks.candidates.filter_candidates: label words kept, distinct, sane length); after
    `max_tries` rounds without k valid ones it raises a SapoError (a failed generation never becomes a candidate).
    With `api_url` the replies come from an OpenAI-compatible chat API (`api_model`), else from the local `model`.
    The request is `custom_meta_prompt` (a MetaPrompt, from --meta-prompt FILE) or the built-in one in the task's
    language. Results are cached in `cache_path` (JSON) under the task's content, the paraphraser and the
    meta-prompt; a rerun reuses them. The cache entry also counts the replies asked for and, per validity filter, the
    ones it rejected ("rejected": {filter: count}, summed over every call that added to the entry).
    """
    if k <= 0:
        return []
    who = paraphraser_id or api_model or getattr(getattr(model, "config", None), "_name_or_path", "") or "local"
    chosen = custom_meta_prompt or builtin_meta_prompt(task)
    key_parts = [PARAPHRASE_VERSION, task.name, task.instruction, list(task.label_words), who, temperature, seed]
    key_parts += [chosen.cache_id] if chosen.cache_id else []  # the built-in English keys stay what they were
    key = hashlib.sha256(json.dumps(key_parts).encode()).hexdigest()[:24]
    cache = read_json(cache_path, default={}) if cache_path else {}
    entry = cache.get(key, {})
    stored = entry.get("paraphrases", [])
    pool, _ = filter_candidates(task, list(stored))
    prompt = chosen.render(task)
    rejected: list[tuple[str, str]] = []
    asked = 0
    for attempt in range(max_tries):
        if len(pool) - 1 >= k:
            break
        need = k - (len(pool) - 1)
        if api_url:
            replies = [chat_api(api_url, api_model, prompt, temperature) for _ in range(need)]
        else:
            replies = sample_local(model, tokenizer, prompt, need, temperature, seed * 1000 + attempt)
        asked += len(replies)
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
    if cache_path and asked:  # a failed generation is recorded too: its rejection counts say why it failed
        counts = Counter(entry.get("rejected", {})) + Counter(rejection_filter(problem) for _, problem in rejected)
        cache = read_json(cache_path, default={})
        cache[key] = {"task": task.name, "paraphraser": who, "temperature": temperature, "seed": seed,
                      "meta_prompt": chosen.source, "paraphrases": pool[1:],
                      "replies": entry.get("replies", 0) + asked, "rejected": dict(sorted(counts.items()))}
        write_json(cache_path, cache)
    if len(paraphrases) < k:
        reasons = sorted({p for _, p in rejected})
        raise SapoError(f"paraphrase generation for task {task.name} gave {len(paraphrases)} valid of {k} after "
                        f"{max_tries} rounds (rejected replies: {'; '.join(reasons)[:200] or 'none'}); use a "
                        "stronger --paraphraser, --paraphrase-api, or --candidates FILE")
    return paraphrases
