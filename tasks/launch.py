"""The launch topologies the scripts support, checked before anything is loaded.

Selection scoring and generation read every weight on every process (each process holds the full model, as under
DDP). FSDP and DeepSpeed ZeRO-3 shard the parameters, so those passes would see only a shard: such a launch is
refused in one line instead of failing deep inside a forward. (Seen here: accelerate 1.15 does not construct an FSDP
Accelerator without a GPU, "There are currently no available devices found"; with ACCELERATE_USE_CPU=1 and
`--use_fsdp` it quietly builds a DDP one (MULTI_CPU), even when handed an FSDP plugin. So FSDP cannot be exercised on
CPU; the refusal is, through a real 2-process `accelerate launch --use_fsdp`.)
An 8B model in bf16 with LoRA fits one 80 GB GPU per process: launch with DDP (`--multi_gpu`).
"""
from __future__ import annotations

import os

from tasks.errors import SapoError


def check_launch(script: str, environ=None):
    """Refuse FSDP and ZeRO-3 launches (set by `accelerate launch` in the environment) in one line."""
    env = os.environ if environ is None else environ
    if env.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        raise SapoError(f"{script} does not support FSDP: selection scoring and generation need the full weights "
                        "on every process; launch with DDP (accelerate launch --multi_gpu)")
    if env.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true" and env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE") == "3":
        raise SapoError(f"{script} does not support DeepSpeed ZeRO-3: selection scoring and generation need the "
                        "full weights on every process; use ZeRO stage 0-2 or DDP (accelerate launch --multi_gpu)")
