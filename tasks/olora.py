"""O-LoRA (Wang et al. 2023): orthogonality between the new adapter's A matrices and the earlier tasks' A matrices,
added to the training loss of each optimizer step (train_sapo.py --method o-lora).

The penalty reads the LoRA weights directly, outside the modules that own them. Under DDP and ZeRO 0-2 every process
holds them whole; under ZeRO-3 they are partitioned outside their module's forward, so the penalty runs inside a
forward of the training module with them registered as its external parameters (olora_step_penalty); under FSDP2
they are DTensor shards, gathered whole for the penalty (`whole`), the penalty's gradient landing on each shard
directly, next to the reduce-scattered gradient of the forward (the penalty then counts once, as under DDP's
average of the same penalty on every process)."""
from __future__ import annotations

import torch

from tasks.train_step import InForward


def olora_penalty(peft_model, new: str, previous: list[str], lambda1: float, lambda2: float):
    """lambda1 * sum over LoRA modules of sum |A_prev A_new^T|  +  lambda2 * sum over new LoRA tensors of ||p||_2.

    A_prev stacks the earlier tasks' A matrices of the module (r_prev x d_in), A_new is (r x d_in); the L1 norm of
    their product is zero when the new adapter reads a subspace orthogonal to every earlier one. The L2 term follows
    the O-LoRA code: the sum of the 2-norms of each new LoRA parameter tensor.
    """
    orth = torch.zeros(())
    l2 = torch.zeros(())
    for module in peft_model.modules():
        lora_a = getattr(module, "lora_A", None)
        if lora_a is None or new not in lora_a:
            continue
        a_new = whole(lora_a[new].weight)
        orth = orth.to(a_new.device)
        if previous:
            a_prev = torch.cat([whole(lora_a[p].weight) for p in previous], dim=0).detach()
            orth = orth + (a_prev @ a_new.T).abs().sum()
        if lambda2:
            l2 = l2.to(a_new.device) + a_new.norm(p=2) + whole(module.lora_B[new].weight).norm(p=2)
    return lambda1 * orth + lambda2 * l2.to(orth.device), orth


def whole(weight):
    """An FSDP2 weight (a DTensor shard) gathered whole, differentiably (collective: every process computes the
    penalty at the same point of the step): its gradient goes back to this process's shard, whole on every process,
    as the penalty is computed alike on each. Any other weight as it is."""
    from torch.distributed.tensor import DTensor

    return weight.full_tensor() if isinstance(weight, DTensor) else weight


def penalty_weights(peft_model, new: str, previous: list[str], lambda2: float) -> list:
    """The LoRA weights olora_penalty reads: every A matrix of `new` and `previous`, and new's B when lambda2 > 0."""
    weights = []
    for module in peft_model.modules():
        lora_a = getattr(module, "lora_A", None)
        if lora_a is None or new not in lora_a:
            continue
        weights += [lora_a[a].weight for a in [new, *previous]]
        if lambda2:
            weights.append(module.lora_B[new].weight)
    return weights


def olora_step_penalty(accelerator, model, name: str, previous: list[str], config):
    """The O-LoRA penalty of one optimizer step, as a term for the loss of ONE micro-batch per process.

    accelerate (or DeepSpeed) divides every micro-batch loss by the accumulation steps and DDP averages gradients over
    processes, so the term is the penalty times the accumulation steps: each process's gradient then holds the penalty
    once, their average too. The step's gradient is that of (token-mean CE + penalty), whatever the number of
    micro-batches and processes. `config`: train_sapo's Config (olora_lambda1, olora_lambda2). Returns (term, orth)
    with orth = sum |A_prev A_new^T| for the log."""
    training_module = accelerator.unwrap_model(model)
    weights = penalty_weights(training_module, name, previous, config.olora_lambda2)
    if any(hasattr(p, "ds_id") for p in weights):
        # ZeRO-3: outside a forward these weights are partitioned (shape (0,)). Registered as external parameters of
        # the training module, the engine gathers them for its forward and again for the backward, and reduces the
        # gradient as any other; the penalty is computed inside a forward of that module (tasks.train_step.InForward).
        import deepspeed

        for p in weights:
            deepspeed.zero.register_external_parameter(training_module, p)
        penalty, orth = model(InForward(lambda peft_model: olora_penalty(
            peft_model, name, previous, config.olora_lambda1, config.olora_lambda2)))
    else:
        penalty, orth = olora_penalty(training_module, name, previous, config.olora_lambda1, config.olora_lambda2)
    return penalty * accelerator.gradient_accumulation_steps, orth
