"""resolve_dtype, until branch `data` lands: the same function (same name, signature and behaviour) is in its
tasks/models.py. At the merge, import it from tasks.models in train_sapo.py and score_prompts.py and delete this file.
"""
from __future__ import annotations

from tasks.errors import SapoError

def resolve_dtype(name: str, device):
    """auto|bf16|fp16|fp32 (or bfloat16|float16|float32) -> the torch dtype to load base weights in. auto: bf16 on a
    CUDA device that supports it, else fp32 (CPUs run bf16 matmuls slowly or not at all)."""
    import torch

    names = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
             "fp32": torch.float32, "float32": torch.float32}
    if name == "auto":
        on_cuda = torch.device(device).type == "cuda" and torch.cuda.is_available()
        return torch.bfloat16 if on_cuda and torch.cuda.is_bf16_supported() else torch.float32
    if name not in names:
        raise SapoError(f"unknown dtype {name!r}: expected auto, bf16, fp16 or fp32")
    return names[name]
