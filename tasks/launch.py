"""The launch topology a script runs under, read from what accelerate hands the process, and the launches refused.

Two steps, so that what is supported can change in one place:
1. derive a typed `Launch` (engine ddp / deepspeed / fsdp, ZeRO stage, offload, micro-batch size, clipping,
   accumulation, mixed precision) from the environment `accelerate launch` sets, the DeepSpeed JSON that environment
   names (`--deepspeed_config_file`, or `deepspeed_config_file:` in an accelerate config file, which the launcher turns
   into ACCELERATE_DEEPSPEED_CONFIG_FILE), and, once built, the Accelerator's own state (`launch_of`);
2. refuse, in one line, whatever the scripts cannot honour (`refuse_unsupported`), before any model loads.

Sharded launches (DeepSpeed ZeRO-3, torch FSDP2) run where tasks/sharding.py makes scoring, training and
generation work on the sharded model (SHARDED_SCRIPTS; train_sapo.py under FSDP2 trains each task on a fresh tree,
sharded once; O-LoRA's penalty on sharded weights: tasks/olora.py; probe_prompts.py under ZeRO-3 only);
`refuse_sharded` refuses the rest: FSDP version 1, probe_prompts.py under FSDP, and NVMe offload. (Seen here:
accelerate 1.15 does not construct an FSDP Accelerator without a GPU, "There are currently no available devices
found"; with ACCELERATE_USE_CPU=1 and `--use_fsdp` it quietly builds a DDP one (MULTI_CPU), which
`check_accelerator` refuses.)

DeepSpeed ZeRO 0-2 train exactly what DDP trains: the script keeps its own accumulation (token-budget micro-batches
vary in number), so DeepSpeed's gradient_accumulation_steps is 1 and `accelerator.sync_gradients` marks the last
micro-batch of a step (train_sapo.train_task); clipping is DeepSpeed's `gradient_clipping` (accelerate's
clip_grad_norm_ does nothing under DeepSpeed), set to --max-grad-norm; the optimizer (torch AdamW) and the
learning-rate schedule are the script's. `configure_deepspeed` writes those values into the plugin's config before
`accelerator.prepare`.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

from tasks.errors import SapoError

AUTO = "auto"  # a DeepSpeed config value the launcher or the script fills in


@dataclass
class Launch:
    """What a launch asks for. DeepSpeed fields are None (or "none") for other engines; "auto" = not fixed by the
    launch, filled by the script (configure_deepspeed)."""

    engine: str  # ddp (one process or DDP) | deepspeed | fsdp
    source: str  # where the DeepSpeed settings were read: the environment, the JSON file, or the accelerator
    zero_stage: int | None = None
    offload_optimizer: str = "none"  # none | cpu | nvme
    offload_param: str = "none"  # none | cpu | nvme
    micro_batch_size: int | str | None = None  # DeepSpeed's train_micro_batch_size_per_gpu
    train_batch_size: int | str | None = None  # DeepSpeed's train_batch_size
    gradient_accumulation_steps: int | str | None = None  # DeepSpeed's (or accelerate's, any engine)
    gradient_clipping: float | str | None = None  # DeepSpeed's gradient_clipping (None = absent: no clipping)
    mixed_precision: str = "no"  # no | bf16 | fp16: accelerate's --mixed_precision, or the DeepSpeed JSON's
    optimizer: dict | None = None  # the DeepSpeed JSON's "optimizer" section, if any
    scheduler: dict | None = None  # the DeepSpeed JSON's "scheduler" section, if any
    fsdp_version: int | None = None
    config_file: str | None = None  # the DeepSpeed JSON, if one was given
    bfloat16_section_ignored: bool = False  # its old-style "bfloat16" section disagrees with what runs

    @property
    def sharded(self) -> bool:
        """Parameters split across processes: each holds only a shard of the weights."""
        return self.engine == "fsdp" or (self.engine == "deepspeed" and self.zero_stage == 3)

    def describe(self) -> str:
        if self.engine != "deepspeed":
            return self.engine if self.engine != "fsdp" else f"fsdp (version {self.fsdp_version})"
        offload = f", optimizer offloaded to {self.offload_optimizer}" if self.offload_optimizer != "none" else ""
        return (f"deepspeed ZeRO-{self.zero_stage}{offload}, mixed precision {self.mixed_precision}"
                + (f" ({self.config_file})" if self.config_file else ""))


@dataclass
class TrainingRecipe:
    """What a training script will do, for the settings a DeepSpeed config must agree with."""

    max_grad_norm: float
    schedule: str  # train_sapo's --schedule
    micro_batch_size: int  # sequences per forward without a token budget (DeepSpeed's nominal micro-batch size)
    method: str = "lora-inc"  # train_sapo's --method (O-LoRA reads the LoRA weights outside a forward)


def _is_true(value) -> bool:
    """accelerate's and DeepSpeed's spellings of true (accelerate's str_to_bool also takes 1 / yes / on)."""
    return str(value).strip().lower() in ("true", "1", "yes", "y", "on")


def _number(value):
    """A DeepSpeed / accelerate value as given: "auto" stays, numbers become int or float."""
    if value is None or value == AUTO or isinstance(value, (int, float)):
        return value
    text = str(value).strip().lower()
    if text in ("", "none"):
        return None
    try:
        number = float(text)
    except ValueError:
        return value
    return int(number) if number.is_integer() and "." not in text and "e" not in text else number


def read_deepspeed_json(path: str) -> dict:
    """The DeepSpeed JSON a launch names; one line naming the file when it cannot be read."""
    try:
        with open(path) as f:
            config = json.load(f)
    except FileNotFoundError:
        raise SapoError(f"DeepSpeed config {path} does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SapoError(f"DeepSpeed config {path} cannot be read as JSON: {e}") from None
    if not isinstance(config, dict):
        raise SapoError(f"DeepSpeed config {path} must hold a JSON object, not {type(config).__name__}")
    return config


def _mixed_precision_of(ds_config: dict, launcher_precision: str) -> str:
    """accelerate's rule (DeepSpeedPlugin.set_mixed_precision): a "bf16" / "fp16" section's "enabled" holds unless it
    is "auto", which --mixed_precision fills; a missing section takes --mixed_precision."""
    for name in ("bf16", "fp16"):
        section = ds_config.get(name)
        if section is None or section.get("enabled") == AUTO:
            enabled = launcher_precision == name
        else:
            enabled = _is_true(section.get("enabled", False))
        if enabled:
            return name
    return "no"


def _old_bfloat16_ignored(ds_config: dict, launcher_precision: str) -> bool:
    """DeepSpeed's older "bfloat16" key (the authors' configs use it) is shadowed by the "bf16" section accelerate
    always adds: it is ignored whenever it disagrees with the effective bf16 setting."""
    old = ds_config.get("bfloat16")
    if old is None or "bf16" in ds_config or old.get("enabled") == AUTO:
        return False
    return _is_true(old.get("enabled", False)) != (launcher_precision == "bf16")


def deepspeed_launch(ds_config: dict, source: str, mixed_precision: str = "no", config_file: str | None = None,
                     stage_default: int | None = 2) -> Launch:
    """A Launch from a DeepSpeed config dict (the JSON file's, or the plugin's once accelerate has filled it)."""
    zero = ds_config.get("zero_optimization") or {}
    stage = _number(zero.get("stage", stage_default))
    if stage == AUTO:
        stage = stage_default
    return Launch(
        engine="deepspeed", source=source, zero_stage=stage,
        offload_optimizer=str((zero.get("offload_optimizer") or {}).get("device") or "none").lower(),
        offload_param=str((zero.get("offload_param") or {}).get("device") or "none").lower(),
        micro_batch_size=_number(ds_config.get("train_micro_batch_size_per_gpu", AUTO)),
        train_batch_size=_number(ds_config.get("train_batch_size", AUTO)),
        gradient_accumulation_steps=_number(ds_config.get("gradient_accumulation_steps", AUTO)),
        gradient_clipping=_number(ds_config.get("gradient_clipping")),
        mixed_precision=_mixed_precision_of(ds_config, mixed_precision),
        bfloat16_section_ignored=_old_bfloat16_ignored(ds_config, mixed_precision),
        optimizer=ds_config.get("optimizer"), scheduler=ds_config.get("scheduler"), config_file=config_file)


def read_launch(environ=None) -> Launch:
    """The launch `accelerate launch` set up for this process, from its environment and the files it names.

    Precedence follows accelerate's DeepSpeedPlugin: a value in the DeepSpeed JSON wins unless it is "auto", which
    the launcher's flags (--zero_stage, --gradient_clipping, ...) fill."""
    env = os.environ if environ is None else environ
    mixed_precision = env.get("ACCELERATE_MIXED_PRECISION", "no").lower()
    accumulation = _number(env.get("ACCELERATE_GRADIENT_ACCUMULATION_STEPS"))
    if _is_true(env.get("ACCELERATE_USE_FSDP", "")):
        return Launch(engine="fsdp", source="environment", fsdp_version=int(env.get("FSDP_VERSION", "1") or 1),
                      mixed_precision=mixed_precision, gradient_accumulation_steps=accumulation)
    if not _is_true(env.get("ACCELERATE_USE_DEEPSPEED", "")):
        return Launch(engine="ddp", source="environment", mixed_precision=mixed_precision,
                      gradient_accumulation_steps=accumulation)
    flags = {
        "train_micro_batch_size_per_gpu": AUTO, "train_batch_size": AUTO,
        "gradient_accumulation_steps": accumulation if accumulation is not None else AUTO,
        "zero_optimization": {
            "stage": _number(env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")),
            "offload_optimizer": {"device": env.get("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE", "none")},
            "offload_param": {"device": env.get("ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE", "none")}},
    }
    clipping = _number(env.get("ACCELERATE_GRADIENT_CLIPPING"))
    if clipping is not None:
        flags["gradient_clipping"] = clipping
    path = env.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "none")
    if path in ("", "none"):
        return deepspeed_launch(flags, "environment", mixed_precision)
    merged = read_deepspeed_json(path)
    for key in ("train_micro_batch_size_per_gpu", "train_batch_size", "gradient_accumulation_steps",
                "gradient_clipping"):
        if merged.get(key, AUTO) == AUTO and key in flags:
            merged[key] = flags[key]
    zero = dict(merged.get("zero_optimization") or {})
    if zero.get("stage", AUTO) == AUTO:
        zero["stage"] = flags["zero_optimization"]["stage"]
    for part in ("offload_optimizer", "offload_param"):
        if (zero.get(part) or {}).get("device", AUTO) == AUTO:
            zero[part] = flags["zero_optimization"][part]
    merged["zero_optimization"] = zero
    return deepspeed_launch(merged, path, mixed_precision, config_file=path)


def launch_of(accelerator) -> Launch:
    """The launch as the built Accelerator holds it (accelerate has merged the flags, the JSON and the mixed
    precision into its plugin by then); read before any model loads."""
    from accelerate.utils import DistributedType

    state = accelerator.state
    mixed_precision = str(accelerator.mixed_precision)
    if state.distributed_type == DistributedType.FSDP:
        return Launch(engine="fsdp", source="accelerator", fsdp_version=getattr(state.fsdp_plugin, "fsdp_version", 1),
                      mixed_precision=mixed_precision)
    if state.distributed_type != DistributedType.DEEPSPEED:
        return Launch(engine="ddp", source="accelerator", mixed_precision=mixed_precision,
                      gradient_accumulation_steps=accelerator.gradient_accumulation_steps)
    # accelerate sets its own mixed_precision to "no" under DeepSpeed: the plugin's config holds the bf16 / fp16 it
    # filled from --mixed_precision by now.
    config_file = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "none")
    return deepspeed_launch(state.deepspeed_plugin.deepspeed_config, "accelerator", "no",
                            config_file=None if config_file in ("", "none") else config_file)


# ----------------------------------------------------------------------------------------------------------------------
# Refusals: one line each, before any model loads.

# The scripts that run on a sharded model (tasks/sharding.py), per engine; tests/test_sharding.py runs them on 2 CPU
# processes (FSDP2 through torch's fully_shard: accelerate builds no FSDP Accelerator without a GPU).
SHARDED_SCRIPTS = {"zero3": ("train_sapo.py", "score_prompts.py", "evaluate.py", "probe_prompts.py"),
                   "fsdp2": ("train_sapo.py", "score_prompts.py", "evaluate.py")}


def refuse_sharded(launch: Launch, script: str, training: TrainingRecipe | None = None):
    """FSDP2 and ZeRO-3 in the scripts of SHARDED_SCRIPTS; everything else sharded refused in one line."""
    if launch.engine == "fsdp":
        if launch.fsdp_version != 2:
            raise SapoError(f"{script} does not support FSDP version {launch.fsdp_version}: use torch FSDP2 "
                            "(accelerate launch --use_fsdp --fsdp_version 2) or DeepSpeed ZeRO-3")
        if script not in SHARDED_SCRIPTS["fsdp2"]:
            raise SapoError(f"{script} does not support FSDP: its passes need the full weights on every process; use "
                            "DDP (accelerate launch --multi_gpu)")
    if launch.engine == "deepspeed" and launch.zero_stage == 3:
        where = f" (zero_optimization.stage 3 in {launch.config_file})" if launch.config_file else ""
        if script not in SHARDED_SCRIPTS["zero3"]:
            raise SapoError(f"{script} does not support DeepSpeed ZeRO-3{where}: its passes need the full weights on "
                            "every process; use ZeRO stage 0-2 or DDP (accelerate launch --multi_gpu)")
        nvme = [part for part in ("offload_param", "offload_optimizer") if getattr(launch, part) == "nvme"]
        if nvme:
            raise SapoError(f"{script}: DeepSpeed ZeRO-3 with {' and '.join(nvme)} on NVMe{_where(launch)} is not "
                            "supported (not tested); offload to the CPU (\"device\": \"cpu\") or not at all")


def _where(launch: Launch) -> str:
    return f" in {launch.config_file}" if launch.config_file else ""


def _all_auto(section: dict) -> bool:
    return all(v == AUTO for v in (section.get("params") or {}).values())


def refuse_deepspeed(launch: Launch, script: str, training: TrainingRecipe | None):
    """DeepSpeed settings the scripts cannot honour. `training` None: a script that does not train (it never hands
    the model to DeepSpeed), which only needs the parameters whole."""
    if launch.engine != "deepspeed":
        return
    if launch.zero_stage not in (0, 1, 2, 3):
        raise SapoError(f"{script}: DeepSpeed zero_optimization.stage {launch.zero_stage!r}{_where(launch)} is not "
                        "a ZeRO stage (0-3)")
    if launch.bfloat16_section_ignored:
        raise SapoError(f"{script}: the DeepSpeed \"bfloat16\" section{_where(launch)} is ignored under accelerate "
                        "(which sets \"bf16\" from --mixed_precision): rename it \"bf16\", or pass the same choice "
                        "as accelerate launch --mixed_precision")
    if launch.offload_param != "none" and launch.zero_stage != 3:
        raise SapoError(f"{script}: DeepSpeed offload_param ({launch.offload_param}){_where(launch)} offloads "
                        "parameters, which only ZeRO-3 does; remove it (offload_optimizer is supported)")
    if training is None:
        return
    if launch.mixed_precision == "fp16":
        raise SapoError(f"{script}: DeepSpeed fp16{_where(launch)} skips optimizer steps on loss-scale overflow, "
                        "which the script's step count and schedule would not follow; use bf16 (or no mixed precision)")
    if launch.gradient_accumulation_steps not in (None, AUTO, 1):
        raise SapoError(f"{script} accumulates over its own micro-batches (--global-batch-size): DeepSpeed's "
                        f"gradient_accumulation_steps {launch.gradient_accumulation_steps}{_where(launch)} must be 1 "
                        "or auto")
    if isinstance(launch.micro_batch_size, str) and launch.micro_batch_size != AUTO:
        raise SapoError(f"{script}: DeepSpeed train_micro_batch_size_per_gpu {launch.micro_batch_size!r}"
                        f"{_where(launch)} must be an integer or auto")
    if launch.gradient_clipping not in (None, AUTO) and launch.gradient_clipping != training.max_grad_norm:
        raise SapoError(f"{script}: DeepSpeed gradient_clipping {launch.gradient_clipping}{_where(launch)} differs "
                        f"from --max-grad-norm {training.max_grad_norm}: set it to auto (DeepSpeed then clips at "
                        "--max-grad-norm) or pass the same value to both")
    if launch.optimizer is not None:
        kind = str(launch.optimizer.get("type", "")).lower()
        if kind not in ("adamw", "adam") or not _all_auto(launch.optimizer) or (
                kind == "adam" and not _is_true((launch.optimizer.get("params") or {}).get("adam_w_mode", True))):
            raise SapoError(f"{script} trains with its own AdamW (--lr, --weight-decay): the DeepSpeed optimizer "
                            f"section{_where(launch)} must be AdamW with every parameter auto, or be removed")
    if launch.scheduler is not None:
        kind = launch.scheduler.get("type")
        params = launch.scheduler.get("params") or {}
        log_warmup = kind == "WarmupLR" and params.get("warmup_type", "log") == "log" and all(
            v == AUTO for k, v in params.items() if k != "warmup_type")
        if not log_warmup:
            raise SapoError(f"{script} sets the learning rate itself (--schedule): the DeepSpeed scheduler section"
                            f"{_where(launch)} must be WarmupLR with auto parameters (= --schedule warmup-log), or "
                            "be removed")
        if training.schedule != "warmup-log":
            raise SapoError(f"{script}: the DeepSpeed config{_where(launch)} asks for WarmupLR but --schedule is "
                            f"{training.schedule}: pass --schedule warmup-log or remove its scheduler section")


def refuse_unsupported(launch: Launch, script: str, training: TrainingRecipe | None = None):
    """Every launch the script cannot honour, refused in one line."""
    refuse_sharded(launch, script, training)
    refuse_deepspeed(launch, script, training)
    if training is not None and launch.engine != "deepspeed" and launch.gradient_accumulation_steps not in (
            None, AUTO, 1):
        raise SapoError(f"{script} accumulates over its own micro-batches (--global-batch-size): launch without "
                        f"--gradient_accumulation_steps ({launch.gradient_accumulation_steps} given)")


def check_launch(script: str, environ=None, training: TrainingRecipe | None = None) -> Launch:
    """Step 1 and 2 from the environment alone: called first thing, before the Accelerator is built."""
    launch = read_launch(environ)
    refuse_unsupported(launch, script, training)
    return launch


# ----------------------------------------------------------------------------------------------------------------------
# Building the Accelerator for the launch, and the DeepSpeed values the script fills in.

def accelerator_kwargs(launch: Launch) -> dict:
    """Keyword arguments of `Accelerator(...)` for this launch. DeepSpeed without a GPU: its CPU accelerator
    (DS_ACCELERATOR=cpu, set before deepspeed is imported) and a gloo process group; without gloo accelerate asks
    DeepSpeed for its default backend and each process counts itself alone (one process of 1)."""
    import torch

    launched = int(os.environ.get("LOCAL_RANK", -1)) != -1  # by accelerate launch / torchrun: a process group
    if launch.engine != "deepspeed" or torch.cuda.is_available() or not launched:
        return {}
    from accelerate.utils import InitProcessGroupKwargs

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    return {"kwargs_handlers": [InitProcessGroupKwargs(backend="gloo")]}


def check_accelerator(accelerator, script: str, training: TrainingRecipe | None = None,
                      resolved_dtype=None) -> Launch:
    """The Accelerator's own view of the launch, refused like the environment's (the JSON has been merged with the
    launcher's flags and --mixed_precision by now); then, for training, DeepSpeed's fixed values written in."""
    launch = launch_of(accelerator)
    asked = read_launch()
    if asked.engine != launch.engine:  # e.g. --use_deepspeed with ACCELERATE_USE_CPU=1: accelerate quietly builds DDP
        if asked.engine == "fsdp":  # accelerate 1.15 builds FSDP on GPUs (and other accelerators) only
            hint = (" (accelerate builds FSDP on GPUs only: on a CPU, use DeepSpeed ZeRO-3 with DS_ACCELERATOR=cpu "
                    "for a sharded run, or DDP)")
        elif _is_true(os.environ.get("ACCELERATE_USE_CPU", "")):
            hint = (" (ACCELERATE_USE_CPU=1 makes accelerate skip DeepSpeed: unset it; without a GPU the scripts run "
                    "DeepSpeed on its CPU accelerator)")
        else:
            hint = ""
        raise SapoError(f"{script}: the launch asks for {asked.engine} but accelerate built a "
                        f"{accelerator.distributed_type.value} one{hint}")
    refuse_unsupported(launch, script, training)
    if launch.engine != "deepspeed" or training is None:
        return launch
    if launch.train_batch_size not in (None, AUTO):
        expected = (launch.micro_batch_size if isinstance(launch.micro_batch_size, int) else
                    training.micro_batch_size) * accelerator.num_processes
        if launch.train_batch_size != expected:
            raise SapoError(f"{script}: DeepSpeed train_batch_size {launch.train_batch_size}{_where(launch)} must be "
                            f"train_micro_batch_size_per_gpu x processes = {expected} (the global batch is "
                            "--global-batch-size), or auto")
    if launch.mixed_precision == "bf16" and resolved_dtype is not None and str(resolved_dtype) != "torch.bfloat16":
        raise SapoError(f"{script}: DeepSpeed bf16{_where(launch)} casts the whole model to bf16 but --dtype gives "
                        f"{resolved_dtype}: pass --dtype bf16, or disable bf16 (accelerate --mixed_precision no)")
    configure_deepspeed(accelerator, launch, training)
    return launch


def configure_deepspeed(accelerator, launch: Launch, training: TrainingRecipe):
    """The values the script decides, written into accelerate's DeepSpeed config before `accelerator.prepare`:
    - gradient_accumulation_steps 1: the script accumulates itself and marks each step's last micro-batch;
    - an integer train_micro_batch_size_per_gpu ("auto" makes prepare() without a dataloader raise): DeepSpeed only
      counts with it (its train_batch_size check), the micro-batches themselves are the script's;
    - gradient_clipping = --max-grad-norm: DeepSpeed's own clipping, the only one that acts under DeepSpeed;
    - the optimizer and scheduler sections accepted by refuse_deepspeed (AdamW / WarmupLR with every value auto: what
      the script builds itself) removed, so that the script's AdamW and schedule are the ones that run;
    - with the optimizer offloaded, the script's torch AdamW steps the fp32 LoRA weights on the CPU (DeepSpeed
      otherwise insists on its own CPU Adam; LoRA weights are small, the cost is negligible)."""
    config = accelerator.state.deepspeed_plugin.deepspeed_config
    micro = launch.micro_batch_size if isinstance(launch.micro_batch_size, int) else training.micro_batch_size
    config["gradient_accumulation_steps"] = 1
    config["train_micro_batch_size_per_gpu"] = micro
    config["train_batch_size"] = micro * accelerator.num_processes
    config["gradient_clipping"] = training.max_grad_norm
    config.pop("optimizer", None)
    config.pop("scheduler", None)
    if launch.offload_optimizer != "none":
        config["zero_force_ds_cpu_optimizer"] = False
    accelerator.gradient_accumulation_steps = 1

