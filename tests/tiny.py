"""Tiny models and tokenizers built in code for the tests (a few million parameters at most, no hub, no files).

The tokenizer is a byte-level BPE trained on a fixed text with a Qwen-style chat template, so prompt building, label
masks, generation and scoring are exercised with real chat markup.
"""
from __future__ import annotations

import functools

import torch

# A Qwen3-style template: no system message unless given, <think> block when thinking is disabled.
QWEN_STYLE_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['role'] == 'assistant' and loop.last and enable_thinking is defined and not enable_thinking %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}"
    "{{- message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and not enable_thinking %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]

_CORPUS = [
    "Classify the sentiment of the review as positive or negative.",
    "Text: the movie was great and the actors were wonderful. Answer: positive",
    "Count the words in the sentence and answer with a number: 1 2 3 4 5 6 7 8 9 10",
    "Reverse the list of letters. Sort the numbers in increasing order. Summarize the text in a few words.",
    "Is the statement true or false? yes no maybe. Which topic: sports, science, politics, business.",
    "The quick brown fox jumps over the lazy dog. {braces} and [brackets] stay as they are!",
] * 4


@functools.lru_cache(maxsize=None)
def _tokenizer_json() -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=420, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_CORPUS, trainer=trainer)
    return tok.to_str()


def tiny_tokenizer(chat_template: str | None = QWEN_STYLE_TEMPLATE):
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(_tokenizer_json()),
                                  eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tok.chat_template = chat_template
    return tok


def tiny_model(vocab_size: int, arch: str = "llama", seed: int = 0, hidden: int = 64, layers: int = 2):
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen3Config

    common = dict(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                  pad_token_id=0, eos_token_id=2, bos_token_id=1)
    config = (Qwen3Config(head_dim=hidden // 4, **common) if arch == "qwen3"
              else LlamaConfig(tie_word_embeddings=False, **common))
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # Random init gives near-uniform predictions; a larger output scale makes losses differ across prompts.
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(8.0)
    return model.eval()


def qv_lora(net, b_seed: int | None = None):
    """A peft LoRA (r 4, alpha 8, no dropout) on q_proj/v_proj whose B is random: at init B = 0 would make every LoRA A
    gradient zero, and a gradient test would check nothing there."""
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(net, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    if b_seed is not None:
        torch.manual_seed(b_seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    return peft_model


def save_tiny_model_dir(path, arch: str = "llama", seed: int = 0) -> str:
    """A tiny model + tokenizer saved as an HF directory (what `--model DIR` takes)."""
    tok = tiny_tokenizer()
    model = tiny_model(len(tok), arch=model_arch(arch), seed=seed)
    model.config.eos_token_id = tok.convert_tokens_to_ids("<|im_end|>")
    model.config.pad_token_id = tok.pad_token_id
    if model.generation_config is not None:
        model.generation_config.eos_token_id = model.config.eos_token_id
        model.generation_config.pad_token_id = model.config.pad_token_id
    model.save_pretrained(str(path))
    tok.save_pretrained(str(path))
    return str(path)


def model_arch(arch: str) -> str:
    return arch
