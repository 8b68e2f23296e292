"""A model directory with a real architecture and random weights, for speed and memory runs on a machine without hub
access (the lent GPU machines): the layer sizes of SmolLM2-135M, Qwen3-0.6B or Qwen3-8B, written from their configs,
with the small byte-level BPE tokenizer and Qwen-style chat template of the tests (tests/tiny.py). The tokenizer uses
the first few hundred ids only; the embedding and LM head keep the real vocabulary size, so every matmul has the real
shape. Scores and predictions of such a model mean nothing; its timings and memory are those of the real model.

    python bench/random_model.py --arch qwen3-8b --dtype bf16 --out /tmp/qwen3-8b-random
    python score_prompts.py --model /tmp/qwen3-8b-random --task sentiment --dtype bf16 --output /tmp/scores.json
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

# Sizes from the models' published config.json files.
ARCHS = {
    "smollm2-135m": ("llama", dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                   num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                                   rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True)),
    "qwen3-0.6b": ("qwen3", dict(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                                 num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                                 max_position_embeddings=40960, rope_theta=1000000.0, rms_norm_eps=1e-6,
                                 tie_word_embeddings=True)),
    "qwen3-8b": ("qwen3", dict(vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                               num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                               max_position_embeddings=40960, rope_theta=1000000.0, rms_norm_eps=1e-6,
                               tie_word_embeddings=False)),
    # Not a real model: the Qwen3 layer structure at toy sizes, for the GPU suite's CPU dry run.
    "tiny": ("qwen3", dict(vocab_size=4096, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096,
                           rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=False)),
}


def build(arch: str, out: Path, dtype: str = "bf16", seed: int = 0) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen3Config

    from tiny import tiny_tokenizer

    kind, sizes = ARCHS[arch]
    tokenizer = tiny_tokenizer()
    special = dict(eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"), pad_token_id=tokenizer.pad_token_id,
                   bos_token_id=tokenizer.pad_token_id)
    config = (Qwen3Config if kind == "qwen3" else LlamaConfig)(**sizes, **special)
    torch.manual_seed(seed)
    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    model.generation_config.eos_token_id = special["eos_token_id"]
    model.generation_config.pad_token_id = special["pad_token_id"]
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    return out


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", choices=sorted(ARCHS), required=True)
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    print(build(args.arch, Path(args.out), args.dtype))
