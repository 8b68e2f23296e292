"""Sharded launches (torch FSDP2, DeepSpeed ZeRO-3): the weights a forward needs, and the LoRA weights to save.

Under DDP every process holds every weight and a forward reads them directly. A sharded engine keeps 1/N of each
parameter per process and gathers a module's parameters just before that module runs:
- ZeRO-3 (DeepSpeed): hooks on every submodule all-gather its parameters before its forward (and backward) and free
  them after. A parameter read OUTSIDE its module's forward has shape (0,): here the LM head, which the fused
  scoring head (kernels.segment_nll) and the training head (tasks.train_step) read directly. `gathered` gathers it
  (deepspeed.zero.GatheredParameters) around such a read; in training it is registered as an external parameter of
  the training module (deepspeed.zero.register_external_parameter), which the engine then gathers for that module's
  forward and backward.
- FSDP2 (torch `fully_shard`, per decoder layer then a root): each decoder layer unshards itself in its own
  pre-forward hook; the root's own parameters (embeddings, final norm, LM head) are unsharded only by the root's
  forward, which scoring (the backbone, then the fused head) and generation from the inner transformers model never
  call ("aten.embedding.default got mixed torch.Tensor and DTensor"). `weights_for_forward` unshards the root for the
  duration (`FSDPModule.unshard()`, what the root's pre-forward hook does) and reshards it after.
Both engines gather inside a forward with collectives: every process must run the same number of forwards, in the
same order. Scoring runs a discarded batch on a process that has none left, generation pads each process's batch
list to the same length and passes `synced_gpus=True` (processes that finished early keep stepping until all have);
`lockstep(model)` says when that is needed. Nothing here holds more than one module's full weights at a time, apart
from the root group under FSDP2 (embeddings and head, as FSDP2's own root forward does) and the LM head under ZeRO-3.

Saving: peft's `save_pretrained` on sharded weights fails ("invalid python storage") or writes shards of shape (0,);
`adapter_state_dict` gathers one adapter's LoRA tensors (collective: every process calls it) so that
`save_pretrained(..., state_dict=...)` writes what stock `PeftModel.from_pretrained` loads.

The ZeRO-3 hooks belong to an engine: the model is given one as soon as it is loaded (`shard_for_inference`: an
engine without optimizer, DeepSpeed's own ZeRO-3 inference path); each task's training engine replaces it
(`prepare_for_training`: the inference engine's hooks removed first, else both engines would gather and free the same
parameters), and after training (`end_training`: accelerate's free_memory destroys the training engine) a new
inference engine serves that task's evaluation and the next task's selection.

FSDP2 in train_sapo.py: a fresh module tree per task (`shards_per_task`). torch's `fully_shard` applies once per
module ("Each distinct composable distributed API can only be applied to a module once"), and a LoRA added to an
already sharded decoder layer is not one of that layer's FSDP parameters: it would stay whole on every process, its
gradient never reduced. So each task's training starts from an unsharded tree, loaded again (`unsharded_stack`: the
base, then the earlier adapters from their saved directories with stock peft, all active and frozen), the new adapter
is added under the task's seed (the same initial values as on an unsharded run) and the training module is sharded
once, by accelerate's FSDP2 prepare (`prepare_for_training`). That tree, sharded with the training module as root,
then serves the task's evaluation and the next task's selection (`weights_for_forward` unshards that root, recorded
on the transformers model), until the next task's tree replaces it. The alternative, every adapter of the sequence
created up front and one sharding for the whole run, was not taken: FSDP2's unsharded parameter keeps the
requires_grad of its first all-gather (torch 2.13's FSDPParam.init_unsharded_param, as read: it is created once,
with the sharded parameter's flag of that moment, and reused by every later all-gather), so which adapter trains
cannot be switched after sharding through public APIs; and every process would carry every later task's adapter from
the start. The cost of ours: one load of the base
weights per task (from the page cache after the first), not one per process beyond what loading any model costs.
A checkpoint under FSDP2 holds the trainable weights and the optimizer state as whole tensors (torch's
distributed-checkpoint state_dict API, gathered; `save_state` / `load_state`), in the layout of the DDP checkpoint
(model.safetensors) plus FSDP2_OPTIMIZER: megabytes, not the frozen base that accelerate's FSDP save_state writes.

The test seam (tests only): accelerate 1.15 builds no FSDP Accelerator without a GPU (FSDP2 quietly becomes
MULTI_CPU with ACCELERATE_USE_CPU=1), so with CPU_FULLY_SHARD_ENV=1 in the environment of a MULTI_CPU launch, the
scripts take the FSDP2 path and apply torch's `fully_shard` directly (each decoder layer, then the root: the layout of
accelerate's prepare without the embedding and head groups it carves out) where accelerate's FSDP2 prepare would run;
everything else (scoring, generation, training step, checkpoint, saving) is the FSDP2 code of a GPU launch.
"""
from __future__ import annotations

import copy
import gc
import os
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch

NONE, FSDP2, ZERO3 = "none", "fsdp2", "zero3"
CPU_FULLY_SHARD_ENV = "SAPO_TEST_FULLY_SHARD_ON_CPU"  # the test seam (module doc): tests only
FSDP2_OPTIMIZER = "optimizer_fsdp2.pt"  # an FSDP2 checkpoint's optimizer state, whole tensors keyed by parameter name

# The ZeRO-3 inference engine whose hooks are on a model (id of the transformers model -> engine), outside training.
_live_engines: dict[int, object] = {}


def engine_of(model) -> str:
    """Which engine shards `model`'s parameters: ZERO3, FSDP2 or NONE (every weight whole on every process)."""
    params = list(model.parameters())
    if any(hasattr(p, "ds_id") for p in params):
        return ZERO3
    from torch.distributed.tensor import DTensor

    if any(isinstance(p, DTensor) for p in params) or fsdp_roots(model):
        return FSDP2
    return NONE


def launch_engine(accelerator) -> str:
    """The sharding engine an Accelerator was launched with (from its plugins): ZERO3, FSDP2 or NONE."""
    from accelerate.utils import DistributedType

    if cpu_fully_shard(accelerator):
        return FSDP2
    if accelerator.distributed_type == DistributedType.DEEPSPEED and \
            accelerator.state.deepspeed_plugin.zero_stage == 3:
        return ZERO3
    if accelerator.distributed_type == DistributedType.FSDP and \
            getattr(accelerator.state.fsdp_plugin, "fsdp_version", 1) == 2:
        return FSDP2
    return NONE


def cpu_fully_shard(accelerator) -> bool:
    """The test seam (module doc): a MULTI_CPU launch with CPU_FULLY_SHARD_ENV=1 runs FSDP2 through torch's
    fully_shard applied directly."""
    from accelerate.utils import DistributedType

    return os.environ.get(CPU_FULLY_SHARD_ENV) == "1" and accelerator.distributed_type == DistributedType.MULTI_CPU


def shards_per_task(accelerator) -> bool:
    """FSDP2 launches: each task trains on a fresh tree (unsharded_stack) sharded once by prepare_for_training."""
    return launch_engine(accelerator) == FSDP2


def load_device(accelerator):
    """Where a script puts the model it has just loaded: the launch's device, except under FSDP2, whose sharding moves
    each process's own shards there (the whole base on every GPU first would need what sharding is there to avoid)."""
    return "cpu" if launch_engine(accelerator) == FSDP2 else accelerator.device


def lockstep(model) -> bool:
    """True when a forward of `model` runs collectives (sharded): every process must run as many forwards."""
    return engine_of(model) != NONE


def numel(p) -> int:
    """Elements of the whole parameter (a ZeRO-3 parameter's local tensor is empty outside its module's forward)."""
    return getattr(p, "ds_numel", None) or p.numel()


def fsdp_roots(model) -> list:
    """The outermost FSDP2 modules within `model` (the module itself when it is the root)."""
    from torch.distributed.fsdp import FSDPModule

    names = [name for name, m in model.named_modules() if isinstance(m, FSDPModule)]
    outer = [n for n in names if not any(n != o and (o == "" or n.startswith(o + ".")) for o in names)]
    modules = dict(model.named_modules())
    return [modules[n] for n in outer]


@contextmanager
def weights_for_forward(model):
    """Forwards and `generate` of `model` (the transformers model) outside the engine's own wrapper see whole
    weights: FSDP2 unshards its root group for the duration (the decoder layers gather themselves); ZeRO-3's hooks
    gather every module as it runs (the directly read LM head: `gathered`); DDP: nothing to do."""
    outer = model.__dict__.get("_sapo_fsdp_root")  # a training module around `model` is its FSDP2 root
    roots = [outer] if outer is not None else fsdp_roots(model) if engine_of(model) == FSDP2 else []
    for root in roots:
        # What the root's first forward does (torch has no public call for it): the root claims the decoder layers,
        # which the backbone-only forward of scoring would otherwise run first as roots of their own ("FSDP state
        # has already been lazily initialized for model.layers.0" at the next forward through the root).
        root._get_fsdp_state()._lazy_init()
        root.unshard()
    try:
        yield
    finally:
        for root in roots:
            root.reshard()


def gathered(*params):
    """Whole copies of ZeRO-3 `params` (None skipped) while the context lasts (deepspeed.zero.GatheredParameters,
    collective); a no-op for any other parameter."""
    zero_params = [p for p in params if p is not None and hasattr(p, "ds_id")]
    if not zero_params:
        return nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(zero_params, modifier_rank=None)


def adapter_state_dict(peft_model, name: str) -> dict[str, torch.Tensor]:
    """The whole LoRA tensors of adapter `name`, keyed as in peft_model.state_dict(), on every process (collective:
    every process must call it). For `peft_model.save_pretrained(..., state_dict=...)`."""
    from torch.distributed.tensor import DTensor

    named = [(n, p) for n, p in peft_model.named_parameters() if f".{name}." in n or n.endswith(f".{name}")]
    with gathered(*[p for _, p in named]):
        return {n: (p.full_tensor() if isinstance(p, DTensor) else p.data).detach().cpu().clone() for n, p in named}


# ----------------------------------------------------------------------------------------------------------------------
# ZeRO-3 engines through accelerate

def inference_config(deepspeed_config: dict) -> dict:
    """A ZeRO-3 config for an engine without optimizer: the launch's zero_optimization and precision, with the values
    left "auto" (accelerate fills them in only when preparing a training engine) left to DeepSpeed's defaults."""
    def resolved(value):
        if isinstance(value, dict):
            return {k: resolved(v) for k, v in value.items() if v != "auto"}
        return value

    config = {k: resolved(copy.deepcopy(v)) for k, v in deepspeed_config.items()
              if k in ("zero_optimization", "bf16", "fp16") and v != "auto"}
    config.update(train_micro_batch_size_per_gpu=1, gradient_accumulation_steps=1)
    return config


def shard_for_inference(accelerator, model, announce: bool = True):
    """Right after loading: under ZeRO-3, an engine without optimizer puts its gathering hooks on `model` (the
    weights are already partitioned when accelerate's zero3_init loaded them, and partitioned here otherwise);
    under FSDP2 (score_prompts.py, evaluate.py), accelerate shards the model; else the model as it is."""
    engine = launch_engine(accelerator)
    if engine == FSDP2:  # accelerate's prepare_model refuses FSDP2 ("requires a model and an optimizer")
        model = fsdp2_shard(accelerator, model, model)
    if engine == ZERO3:
        import deepspeed

        fill_hidden_size_autos(accelerator, model)  # the same persistence threshold as the training engines'
        ds_engine, *_ = deepspeed.initialize(model=model, config=inference_config(
            accelerator.state.deepspeed_plugin.deepspeed_config))
        _live_engines[id(model)] = ds_engine
    if engine != NONE and announce:
        accelerator.print(f"sharded launch: {engine_of(model)}, each process holds 1/{accelerator.num_processes} of "
                          "the weights")
    return model


def fill_hidden_size_autos(accelerator, net):
    """DeepSpeed's bucket and persistence sizes left "auto" (as in the usual ZeRO-3 configs), filled from the model's
    hidden size with accelerate's own rule: accelerate reads `model.config` of what it prepares, which the training
    module (tasks.train_step.SupervisedNLL) does not have ("Can't find `model.config` entry", raised by prepare,
    that is after the zero-shot row and the first selection)."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return
    zero = accelerator.state.deepspeed_plugin.deepspeed_config.get("zero_optimization") or {}
    config = net.config.get_text_config() if hasattr(net.config, "get_text_config") else net.config
    hidden = config.hidden_size
    for key, value in (("reduce_bucket_size", hidden * hidden),
                       ("stage3_prefetch_bucket_size", int(0.9 * hidden * hidden)),
                       ("stage3_param_persistence_threshold", 10 * hidden)):
        if zero.get(key) == "auto":
            zero[key] = value


def prepare_for_training(accelerator, training_module, optimizer, net):
    """accelerator.prepare(training_module, optimizer), with ZeRO-3's inference engine taken off `net` first (else
    both engines would gather and free the same parameters), and the LM head registered as an external parameter of
    the training module (its forward reads the head's weight directly)."""
    if launch_engine(accelerator) == FSDP2:
        return prepare_fsdp2_training(accelerator, training_module, optimizer, net)
    previous = _live_engines.pop(id(net), None)
    if previous is not None:
        previous.destroy()  # removes its module hooks; the parameters stay partitioned
    fill_hidden_size_autos(accelerator, net)
    if launch_engine(accelerator) == ZERO3:
        import deepspeed

        head = net.get_output_embeddings()
        for p in (head.weight, getattr(head, "bias", None)):
            if p is not None:
                deepspeed.zero.register_external_parameter(training_module, p)
    return accelerator.prepare(training_module, optimizer)


def end_training(accelerator, net):
    """After a task's training: accelerate drops its references (free_memory, which under DeepSpeed also destroys the
    engine and with it the ZeRO-3 hooks; under FSDP2 the sharded tree stays, for evaluation); under ZeRO-3 an
    inference engine's hooks go back on `net` for the evaluation and the next task's selection."""
    _fsdp2_training.clear()
    accelerator.free_memory()
    if launch_engine(accelerator) == ZERO3:
        shard_for_inference(accelerator, net, announce=False)


# ----------------------------------------------------------------------------------------------------------------------
# FSDP2 in train_sapo.py: a fresh tree per task, sharded once (module doc)

# The FSDP2 training module and optimizer of the task being trained (save_state / load_state), outside training none.
_fsdp2_training: dict[str, tuple] = {}


def decoder_layers(net) -> list:
    """The modules accelerate's FSDP2 transformer wrap policy shards one by one: the model's _no_split_modules."""
    names = set(getattr(net, "_no_split_modules", None) or [])
    return [m for m in net.modules() if type(m).__name__ in names]


def fsdp2_shard(accelerator, module, net):
    """Shard `module` (`net` itself, or a training module around it) with FSDP2: accelerate's own preparation
    (fsdp2_prepare_model: the launch's wrap policy, mixed precision, offload and layout) on a GPU launch; under the
    test seam, torch's fully_shard on each decoder layer of `net`, then on `module`."""
    if not cpu_fully_shard(accelerator):
        from accelerate.utils import fsdp2_prepare_model

        return fsdp2_prepare_model(accelerator, module)
    from torch.distributed.fsdp import fully_shard

    for layer in decoder_layers(net):
        fully_shard(layer)
    fully_shard(module)
    return module


def unsharded_stack(model: str, dtype, adapter_dirs: list[str], fused_ops: str = "none"):
    """A fresh, unsharded tree for FSDP2 (module doc): `model` loaded again (tasks.models.load_model, left on the
    CPU: sharding moves each process's shards to its device), patched with `fused_ops` as the first tree was
    (tasks.fused_ops patches module instances), with `adapter_dirs` stacked by stock peft, all active and frozen.
    Returns (the transformers model, the peft model or None without adapters)."""
    from tasks.fused_ops import apply_fused_ops
    from tasks.models import load_model, stack_adapters

    net = load_model(model, dtype=dtype)
    apply_fused_ops(net, fused_ops)
    if not adapter_dirs:
        return net, None
    peft_model = stack_adapters(net, adapter_dirs)
    return peft_model.get_base_model(), peft_model


def prepare_fsdp2_training(accelerator, training_module, optimizer, net):
    """FSDP2: `training_module` (around the unsharded tree of `net`, this task's adapter trainable) sharded once, with
    it as root: accelerate's prepare of the module and optimizer (it maps the optimizer onto the sharded parameters)
    on a GPU launch; under the test seam, fsdp2_shard and the same mapping by parameter name. The root is recorded on
    `net` for weights_for_forward (evaluation and the next selection run on this tree)."""
    # The previous task's sharded tree is no longer referenced but holds a cycle (its root is recorded on its model):
    # freed now, before this tree's shards take its place on the device.
    gc.collect()
    # accelerate's transformer wrap policy reads _no_split_modules of what it prepares: the training module's are the
    # transformers model's (a plain list attribute, not a submodule)
    training_module._no_split_modules = list(getattr(net, "_no_split_modules", None) or [])
    if cpu_fully_shard(accelerator):
        names = {id(p): n for n, p in training_module.named_parameters()}
        fsdp2_shard(accelerator, training_module, net)
        sharded = dict(training_module.named_parameters())
        for group in optimizer.param_groups:
            group["params"] = [sharded[names[id(p)]] for p in group["params"]]
        model = training_module
    else:
        model, optimizer = accelerator.prepare(training_module, optimizer)
    object.__setattr__(net, "_sapo_fsdp_root", model)  # not a submodule of `net`: no cycle in named_modules()
    _fsdp2_training["current"] = (model, optimizer)
    return model, optimizer


def save_state(accelerator, directory: str, **kwargs):
    """accelerator.save_state, except while an FSDP2 training module trains (module doc): its trainable weights
    (model.safetensors, named as the module names them) and its optimizer state (FSDP2_OPTIMIZER), whole tensors
    gathered by torch's distributed-checkpoint API and written by the main process (collective: every process calls
    it)."""
    if "current" not in _fsdp2_training:
        return accelerator.save_state(directory, **kwargs)
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, \
        get_optimizer_state_dict

    model, optimizer = _fsdp2_training["current"]
    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    weights = get_model_state_dict(model, options=options)
    optimizer_state = get_optimizer_state_dict(model, getattr(optimizer, "optimizer", optimizer), options=options)
    if accelerator.is_main_process:
        os.makedirs(directory, exist_ok=True)
        save_file({k: v.contiguous() for k, v in weights.items()}, os.path.join(directory, "model.safetensors"))
        torch.save(optimizer_state, os.path.join(directory, FSDP2_OPTIMIZER))
    accelerator.wait_for_everyone()


def load_state(accelerator, directory: str, **kwargs):
    """accelerator.load_state, except while an FSDP2 training module trains: what save_state wrote, put back into the
    sharded weights and optimizer state (every process reads the files)."""
    if "current" not in _fsdp2_training:
        return accelerator.load_state(directory, **kwargs)
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, \
        set_optimizer_state_dict

    optimizer_file = Path(directory) / FSDP2_OPTIMIZER  # tasks.checkpoints checked it is there (the launch kind)
    model, optimizer = _fsdp2_training["current"]
    options = StateDictOptions(full_state_dict=True, strict=False)
    set_model_state_dict(model, load_file(str(Path(directory) / "model.safetensors")), options=options)
    set_optimizer_state_dict(model, getattr(optimizer, "optimizer", optimizer),
                             torch.load(optimizer_file, weights_only=True), options=options)
