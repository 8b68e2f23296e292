"""Prompt building, exactly as the SAPO reference describes.

One user turn of the tokenizer's chat template, no system message:

    {instruction}\n\nText:\n{input}\n\n{suffix}

and the label as the assistant turn. The supervised tokens are the tokens of the full chat text after the generation
prompt (answer + end-of-turn). Prompt and response are tokenized separately, so the prompt tokens are exactly what
generation sees. User text is only concatenated, never passed through `str.format` (instructions can hold braces).
When a sequence is too long, the INPUT text is shortened; the instruction, suffix, chat markup and answer never are.

The input label ("Text:") is a property of the task (`Task.input_label`), fixed for all its candidate instructions:
"文本:" when the task's original instruction is Chinese (holds Han characters; the authors' code uses it for C-STANCE),
"Text:" otherwise, unless the data names one. An empty instruction (TRACE's Py150) starts the message at the input
label: the authors' code would send two leading newlines, which carry nothing.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from tasks.errors import SapoError

IGNORE_INDEX = -100
# The authors' length limits (their --max_source_length 1536 --max_target_length 128), shared by every script: a
# generation prompt holds at most MAX_SOURCE_LENGTH tokens, a trained or scored example (prompt + answer) at most
# MAX_LENGTH; longer ones have their input text shortened.
MAX_SOURCE_LENGTH = 1536
MAX_TARGET_LENGTH = 128
MAX_LENGTH = MAX_SOURCE_LENGTH + MAX_TARGET_LENGTH
DEFAULT_INPUT_LABEL = "Text:"
CHINESE_INPUT_LABEL = "文本:"
HAN_CHARACTERS = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"  # CJK ideographs (extension A, unified, compatibility)
_HAN_RE = re.compile(f"[{HAN_CHARACTERS}]")


def input_label_for(instruction: str) -> str:
    """The input label a task gets by default: "文本:" for a Chinese instruction, "Text:" otherwise."""
    return CHINESE_INPUT_LABEL if _HAN_RE.search(instruction) else DEFAULT_INPUT_LABEL


def suffix_separator(suffix: str) -> str:
    """What goes between the input and the suffix: the authors' slice rule "\\n\\n"[:len(suffix)] (their
    uie_dataset.py), i.e. nothing before an empty suffix (the message ends with the input), one newline before a
    one-character suffix, a blank line before any longer one."""
    return "\n\n"[:len(suffix)]


def user_message(instruction: str, input_text: str, suffix: str, *, input_label: str = DEFAULT_INPUT_LABEL) -> str:
    """`{instruction}\\n\\n{input_label}\\n{input}\\n\\n{suffix}`; without the leading instruction block when the
    instruction is empty; an empty or one-character suffix is joined by the authors' rule (suffix_separator)."""
    head = instruction + "\n\n" if instruction else ""
    return head + input_label + "\n" + input_text + suffix_separator(suffix) + suffix


def render_chat(tokenizer, messages, add_generation_prompt):
    if not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise SapoError(f"tokenizer {name!r} has no chat template; SAPO prompts are one chat turn "
                        "(use an instruct/chat model, or set tokenizer.chat_template)")
    # enable_thinking=False: Qwen3 templates emit an empty think block, other templates ignore the variable.
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                         enable_thinking=False)


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def render_prompt(tokenizer, instruction: str, input_text: str, suffix: str, *,
                  input_label: str = DEFAULT_INPUT_LABEL) -> str:
    """The chat text up to and including the assistant header (what generation continues)."""
    content = user_message(instruction, input_text, suffix, input_label=input_label)
    return render_chat(tokenizer, [{"role": "user", "content": content}], True)


def render_response(tokenizer, prompt_text: str, instruction: str, input_text: str, suffix: str, answer: str, *,
                    input_label: str = DEFAULT_INPUT_LABEL) -> str:
    """The chat text after the generation prompt: answer + end-of-turn markup."""
    messages = [{"role": "user", "content": user_message(instruction, input_text, suffix, input_label=input_label)},
                {"role": "assistant", "content": answer}]
    full = render_chat(tokenizer, messages, False)
    if not full.startswith(prompt_text):
        raise SapoError("the chat template renders a finished conversation that does not start with its own "
                        "generation prompt; cannot tell which tokens are the response")
    return full[len(prompt_text):]


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX on prompt tokens, the token id on response tokens
    num_prompt_tokens: int
    truncated: bool = False  # the input text was shortened to fit


@dataclass
class EncodedPrompt:
    """A generation prompt (ending with the assistant header) and whether its input text was shortened to fit."""

    input_ids: list[int]
    truncated: bool = False


def _fit(tokenizer, instruction, input_text, suffix, input_label, budget_for, max_length):
    """Render the prompt, shortening the input text (from its end) until `budget_for(prompt_ids)` <= max_length."""
    def render(text):
        return render_prompt(tokenizer, instruction, text, suffix, input_label=input_label)

    prompt_text = render(input_text)
    prompt_ids = _ids(tokenizer, prompt_text)
    if max_length is None or budget_for(prompt_ids) <= max_length:
        return input_text, prompt_text, prompt_ids, False
    input_ids = _ids(tokenizer, input_text)
    keep = len(input_ids)
    # Token counts are not additive across a cut (merges at the boundary), so cut and re-measure until it fits.
    while budget_for(prompt_ids) > max_length:
        keep -= max(1, budget_for(prompt_ids) - max_length)
        if keep < 0:
            fixed = budget_for(_ids(tokenizer, render("")))
            raise SapoError(f"instruction, suffix, chat markup and answer alone take {fixed} tokens, more than the "
                            f"limit of {max_length}; raise the length limit or shorten the instruction")
        input_text = tokenizer.decode(input_ids[:keep])
        prompt_text = render(input_text)
        prompt_ids = _ids(tokenizer, prompt_text)
    return input_text, prompt_text, prompt_ids, True


def encode_example(tokenizer, instruction: str, input_text: str, suffix: str, answer: str,
                   max_length: int | None = None, *, input_label: str = DEFAULT_INPUT_LABEL) -> Encoded:
    """Tokens and labels of one training/scoring sequence; at most `max_length` tokens in all."""
    def response_ids_after(prompt, text):
        return _ids(tokenizer, render_response(tokenizer, prompt, instruction, text, suffix, answer,
                                               input_label=input_label))

    # The response depends on the (possibly shortened) prompt only through the template, so render it once to size it.
    prompt_text = render_prompt(tokenizer, instruction, input_text, suffix, input_label=input_label)
    response_ids = response_ids_after(prompt_text, input_text)
    input_text, prompt_text, prompt_ids, truncated = _fit(
        tokenizer, instruction, input_text, suffix, input_label, lambda p: len(p) + len(response_ids), max_length)
    if truncated:
        response_ids = response_ids_after(prompt_text, input_text)
    return Encoded(prompt_ids + response_ids, [IGNORE_INDEX] * len(prompt_ids) + response_ids, len(prompt_ids),
                   truncated)


def encode_task_example(tokenizer, task, instruction: str, instance, max_length: int | None = None) -> Encoded:
    """encode_example for one Instance of a Task prompted with `instruction`: the task's suffix and input label, the
    instance's input and training label. Training and scoring call this so that they cannot drift apart."""
    return encode_example(tokenizer, instruction, instance.input, task.suffix, instance.label, max_length,
                          input_label=task.input_label)


def encode_generation_prompt(tokenizer, instruction: str, input_text: str, suffix: str,
                             max_length: int | None = None, *,
                             input_label: str = DEFAULT_INPUT_LABEL) -> EncodedPrompt:
    """Prompt tokens for generation (ending with the assistant header), at most `max_length` of them, and whether the
    input text had to be shortened for that."""
    _, _, prompt_ids, truncated = _fit(tokenizer, instruction, input_text, suffix, input_label, len, max_length)
    return EncodedPrompt(prompt_ids, truncated)


def encode_prompt(tokenizer, instruction: str, input_text: str, suffix: str,
                  max_length: int | None = None, *, input_label: str = DEFAULT_INPUT_LABEL) -> list[int]:
    """Prompt tokens for generation (ending with the assistant header); at most `max_length` tokens."""
    return encode_generation_prompt(tokenizer, instruction, input_text, suffix, max_length,
                                    input_label=input_label).input_ids


def pad_batch(sequences: list[list[int]], pad_value: int, side: str = "right") -> torch.Tensor:
    """Stack ragged token lists into one LongTensor, padding on the given side."""
    width = max(len(s) for s in sequences)
    out = torch.full((len(sequences), width), pad_value, dtype=torch.long)
    for i, s in enumerate(sequences):
        if s:
            if side == "right":
                out[i, :len(s)] = torch.tensor(s)
            else:
                out[i, width - len(s):] = torch.tensor(s)
    return out
