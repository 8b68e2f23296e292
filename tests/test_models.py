"""tasks/models.py: dtype resolution, loading base weights in a dtype with fp32 LoRA weights, adapter stacks
(sapo_stack.json), and one-line errors for a model directory without tokenizer or weights and a damaged adapter."""
import json
import shutil

import pytest
import torch

from tasks.errors import SapoError
from tasks.models import STACK_FILE, load_model, load_tokenizer, read_stack, resolve, resolve_dtype
from tiny import save_tiny_model_dir


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model_dir(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="module")
def adapter_dir(model_dir, tmp_path_factory):
    """A LoRA adapter of the tiny model with nonzero B (a fresh LoRA has B = 0 and would change nothing)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    net = AutoModelForCausalLM.from_pretrained(model_dir)
    peft_model = get_peft_model(net, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    path = tmp_path_factory.mktemp("adapters") / "adapter"
    peft_model.save_pretrained(str(path))
    return str(path)


def test_resolve_dtype_on_cpu(monkeypatch):
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert [resolve_dtype(n, "cpu") for n in ("bf16", "fp16", "fp32")] == [torch.bfloat16, torch.float16, torch.float32]
    assert resolve_dtype("bfloat16", "cpu") == torch.bfloat16
    with pytest.raises(SapoError, match="unknown dtype 'half': expected auto, bf16, fp16 or fp32"):
        resolve_dtype("half", "cpu")
    # auto on a CUDA device: bf16 when the device supports it, else fp32 (simulated: no GPU here)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_dtype("auto", "cuda:0") == torch.bfloat16 and resolve_dtype("auto", "cpu") == torch.float32
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_dtype("auto", "cuda") == torch.float32


def test_load_model_bf16_base_fp32_lora(model_dir, adapter_dir):
    plain = load_model(model_dir, dtype=torch.bfloat16)
    assert {p.dtype for p in plain.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in load_model(model_dir).parameters()} == {torch.float32}  # the default
    stacked = load_model(adapter_dir, dtype=torch.bfloat16)
    dtypes = {("lora_" in n, p.dtype) for n, p in stacked.named_parameters()}
    assert dtypes == {(False, torch.bfloat16), (True, torch.float32)}
    ids = torch.tensor([[5, 9, 17, 3]])
    with torch.no_grad():
        logits = stacked(input_ids=ids).logits
        base_logits = plain(input_ids=ids).logits
    assert torch.isfinite(logits).all() and not torch.equal(logits, base_logits)  # the adapter takes part


def test_read_stack(model_dir, adapter_dir, tmp_path):
    task_dir = tmp_path / "run" / "2-task_b"
    task_dir.mkdir(parents=True)
    shutil.copytree(adapter_dir, tmp_path / "run" / "1-task_a" / "adapter")
    (task_dir / STACK_FILE).write_text(json.dumps({
        "base_model": model_dir, "adapters": ["../1-task_a/adapter", adapter_dir],
        "instructions": {"task_a": "Say {it}.", "task_b": "Copy."}}))
    stack = read_stack(task_dir)
    assert stack.base_model == model_dir
    assert stack.adapters == [str(task_dir / "../1-task_a/adapter"), adapter_dir]  # relative to the stack file
    assert stack.instructions == {"task_a": "Say {it}.", "task_b": "Copy."}
    assert read_stack(task_dir / STACK_FILE) == stack
    assert resolve(str(task_dir)) == (model_dir, stack.adapters)
    (task_dir / STACK_FILE).write_text(json.dumps({"base_model": model_dir, "adapters": []}))
    assert read_stack(task_dir).instructions == {}  # runs written before the field
    for content, message in (('{"base_model": ', "malformed JSON in"),
                             (json.dumps({"adapters": []}), "\"base_model\" must name the base model"),
                             (json.dumps({"base_model": "m", "adapters": "a"}), "\"adapters\" must be a list"),
                             (json.dumps({"base_model": "m", "adapters": [], "instructions": {"t": 1}}),
                              "\"instructions\" must map task names to instruction strings")):
        (task_dir / STACK_FILE).write_text(content)
        with pytest.raises(SapoError, match=message) as e:
            read_stack(task_dir)
        assert str(task_dir / STACK_FILE) in str(e.value) and "\n" not in str(e.value)


def test_model_dir_without_tokenizer_or_weights(model_dir, tmp_path):
    no_tokenizer = tmp_path / "no_tokenizer"
    shutil.copytree(model_dir, no_tokenizer)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (no_tokenizer / name).unlink()
    with pytest.raises(SapoError) as e:
        load_tokenizer(str(no_tokenizer))
    assert str(e.value) == (f"model directory {no_tokenizer} has no tokenizer files (none of tokenizer.json, "
                            "tokenizer.model, vocab.json, tokenizer_config.json); save them there with save_pretrained")
    no_weights = tmp_path / "no_weights"
    shutil.copytree(model_dir, no_weights)
    (no_weights / "model.safetensors").unlink()
    with pytest.raises(SapoError, match=f"model directory {no_weights} has no weight files"):
        load_model(str(no_weights))


def test_damaged_adapter_is_one_line_naming_the_file(model_dir, adapter_dir, tmp_path):
    damaged = tmp_path / "damaged"
    shutil.copytree(adapter_dir, damaged)
    weights = damaged / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(SapoError) as e:
        load_model(str(damaged))
    assert str(e.value).startswith(f"cannot load adapter {weights} (SafetensorError: ")
    assert "\n" not in str(e.value)
    (damaged / "adapter_config.json").write_text("{not json")
    with pytest.raises(SapoError, match=f"malformed JSON in {damaged / 'adapter_config.json'}"):
        load_model(str(damaged))
