"""Ours: Liger-Kernel's fused RMSNorm, SwiGLU and RoPE in the model's layers (`--fused-ops liger`).

liger_kernel.transformers patches a loaded model in place (its apply_liger_kernel_to_<model type>(model=...)): every
RMSNorm module and MLP of the instance gets Liger's Triton forward and backward, and the model type's module-level
apply_rotary_pos_emb becomes Liger's (that one for every model of the type in the process). Its loss kernels stay
off: the LM head and the loss are tasks.train_step's. The kernels are Triton GPU kernels: they do not run on CPU,
not even under TRITON_INTERPRET=1 (triton 3.7.1: `'float' object has no attribute 'to'` in their first kernel).
"""
from __future__ import annotations

from tasks.errors import SapoError

FUSED_OPS_CHOICES = ("none", "liger")


def apply_fused_ops(net, fused_ops: str) -> list[str]:
    """Patch the transformers model `net` with `fused_ops`; returns what was replaced (for the log)."""
    if fused_ops not in FUSED_OPS_CHOICES:
        raise SapoError(f"--fused-ops {fused_ops}: must be one of {', '.join(FUSED_OPS_CHOICES)}")
    if fused_ops == "none":
        return []
    try:
        from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN
    except ImportError as e:
        raise SapoError(f"--fused-ops liger needs the liger-kernel package ({e}); pip install -r "
                        "requirements-gpu-suite.txt, or carry its wheel (bash bench/gpu_suite.sh prepare)") from None
    model_type = net.config.model_type
    apply = MODEL_TYPE_TO_APPLY_LIGER_FN.get(model_type)
    if apply is None:
        raise SapoError(f"--fused-ops liger: liger-kernel has no kernels for model type {model_type!r}")
    import inspect

    wanted = dict(rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=False)
    accepted = inspect.signature(apply).parameters
    apply(model=net, **{k: v for k, v in wanted.items() if k in accepted})
    return ["RMSNorm", "SwiGLU MLP", "RoPE"]
