"""The folded adapter (tasks/fold.py): k stacked LoRAs of different ranks, alphas (rsLoRA included) and targets give
the same logits and greedy answers as one folded LoRA; the model is exactly as before afterwards; the export is a
stock peft directory that plain `PeftModel.from_pretrained` loads in a fresh process with the same logits."""
import json
import os
import subprocess
import sys

import pytest
import torch

import evaluate
from tasks.errors import SapoError
from tasks.fold import FOLDED, fold_active_adapters, folded_adapter, lora_layers
from tasks.models import activate_adapters, adapter_name, load_model
from test_evaluate import INPUTS, accelerator, make_task  # noqa: F401 -- accelerator is a fixture
from tiny import save_tiny_model_dir, tiny_model, tiny_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (r, alpha, targets, rslora): every adapter differs; the second targets q_proj only (zero blocks in v_proj/o_proj)
ADAPTERS = [(2, 4, ["q_proj", "v_proj"], False), (4, 16, ["q_proj"], False), (3, 3, ["q_proj", "v_proj"], True),
            (8, 8, ["v_proj", "o_proj"], False)]
# fp32 everywhere: B A x summed over one concatenated rank axis instead of k separate matmuls; the logits (|x| up to
# ~10) differ by rounding only
ATOL = 1e-5


def stacked_model(k, tokenizer, seed=0):
    """A tiny model with the first k ADAPTERS, all active, random non-zero B (not peft's zero init)."""
    from peft import LoraConfig, get_peft_model

    model = tiny_model(len(tokenizer), seed=seed)
    peft_model = None
    for i, (r, alpha, targets, rslora) in enumerate(ADAPTERS[:k]):
        torch.manual_seed(100 + i)
        config = LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, use_rslora=rslora, lora_dropout=0.1,
                            init_lora_weights=False)
        if peft_model is None:
            peft_model = get_peft_model(model, config, adapter_name=adapter_name(i))
        else:
            peft_model.add_adapter(adapter_name(i), config)
    activate_adapters(peft_model, [adapter_name(i) for i in range(k)], trainable=adapter_name(k - 1))
    return peft_model


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


IDS = torch.tensor([[5, 17, 33, 2, 90, 41, 7, 250, 12, 64]])


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_folded_logits_equal_stacked(k, one_thread):
    tokenizer = tiny_tokenizer()
    peft_model = stacked_model(k, tokenizer)
    net = peft_model.get_base_model().eval()
    before = logits(net, IDS)
    base_before = {n: p.clone() for n, p in net.named_parameters() if "lora_" not in n}
    grads_before = {n: p.requires_grad for n, p in net.named_parameters()}
    with folded_adapter(net) as folded:
        assert folded.rank == sum(r for r, *_ in ADAPTERS[:k])
        assert all(layer.active_adapters == [FOLDED] for name, layer in lora_layers(net).items()
                   if name in folded.modules)
        inside = logits(net, IDS)
    # independent of peft's stacking: the same sum written out in float64 on a copy of the base model
    reference = logits_by_hand(net, IDS)
    torch.testing.assert_close(inside, before, atol=ATOL, rtol=0)
    torch.testing.assert_close(inside.double(), reference, atol=ATOL, rtol=0)
    assert not torch.equal(before, logits(tiny_model(len(tokenizer)), IDS))  # the adapters do change the output
    # afterwards: the same model, bit for bit, the same active adapters and trainable flags, no fold left
    assert torch.equal(logits(net, IDS), before)
    assert all(torch.equal(p, base_before[n]) for n, p in net.named_parameters() if "lora_" not in n)
    assert {n: p.requires_grad for n, p in net.named_parameters()} == grads_before
    assert not any(FOLDED in layer.lora_A for layer in lora_layers(net).values())


def logits_by_hand(net, ids):
    """float64: every LoRA module's output = W x + sum_i s_i B_i A_i x, through forward hooks on the base layers."""
    model = tiny_model(len(tiny_tokenizer())).double()
    layers = lora_layers(net)
    hooks = []
    for name, layer in layers.items():
        deltas = [(layer.lora_A[a].weight.double(), layer.lora_B[a].weight.double(), layer.scaling[a])
                  for a in layer.active_adapters if a in layer.lora_A]

        def hook(module, args, out, deltas=deltas):
            return out + sum(s * (args[0] @ A.T @ B.T) for A, B, s in deltas)

        hooks.append(model.get_submodule(name).register_forward_hook(hook))
    try:
        return logits(model, ids)
    finally:
        for h in hooks:
            h.remove()


def test_folded_greedy_answers_identical(one_thread, accelerator):  # noqa: F811
    tokenizer = tiny_tokenizer()
    net = stacked_model(4, tokenizer).get_base_model().eval()
    task = make_task(INPUTS)
    args = dict(max_new_tokens=8, progress=False, batch_size=2)
    folded = evaluate.generate_answers(net, tokenizer, task, task.instruction, task.test, accelerator, **args)
    unmerged = evaluate.generate_answers(net, tokenizer, task, task.instruction, task.test, accelerator, fold=False,
                                         **args)
    assert folded == unmerged and any(folded)
    plain = evaluate.generate_answers(tiny_model(len(tokenizer)), tokenizer, task, task.instruction, task.test,
                                      accelerator, **args)
    assert plain != folded  # the adapters change the answers: the comparison above is not vacuous


def test_nothing_to_fold_without_adapters(one_thread):
    net = tiny_model(len(tiny_tokenizer()))
    assert fold_active_adapters(net) is None
    with folded_adapter(net) as folded:
        assert folded is None


def test_dora_is_refused_in_one_line(one_thread):
    from peft import LoraConfig, get_peft_model

    net = get_peft_model(tiny_model(len(tiny_tokenizer())), LoraConfig(r=2, target_modules=["q_proj"], use_dora=True))
    with pytest.raises(SapoError, match="uses a LoRA variant") as e:
        fold_active_adapters(net.get_base_model())
    assert "\n" not in str(e.value)


def write_stack(tmp_path, k):
    """A run's task folder after task k: a tiny base model dir, k adapter dirs, sapo_stack.json."""
    base = save_tiny_model_dir(tmp_path / "base")  # tiny_model(seed=0): the weights stacked_model adapts
    peft_model = stacked_model(k, tiny_tokenizer())
    task_dir = tmp_path / "run" / f"{k}-task{k}"
    task_dir.mkdir(parents=True)
    adapters = []
    for i in range(k):
        out = tmp_path / "run" / f"{i + 1}-task{i + 1}" / "adapter"
        peft_model.save_pretrained(str(out.parent / "save"), selected_adapters=[adapter_name(i)])
        saved = out.parent / "save" / adapter_name(i)
        saved.rename(out)
        adapters.append(os.path.relpath(out, task_dir))
    (task_dir / "sapo_stack.json").write_text(json.dumps({"base_model": base, "adapters": adapters,
                                                          "instructions": {}}))
    return base, task_dir


FRESH = """
import sys, torch
from peft import PeftModel
from transformers import AutoModelForCausalLM
base = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)
model = PeftModel.from_pretrained(base, sys.argv[2]).eval()
with torch.no_grad():
    torch.save(model(input_ids=torch.tensor(%s)).logits, sys.argv[3])
"""


def test_export_loads_in_stock_peft_in_a_fresh_process(tmp_path, one_thread, capsys):
    base, task_dir = write_stack(tmp_path, 4)
    net = load_model(str(task_dir))  # the stack as evaluate.py and train_sapo.py load it: 4 adapters, unmerged
    stacked = logits(net, IDS)
    out = tmp_path / "export"
    evaluate.main(["--export-adapter", str(task_dir), str(out)])
    printed = capsys.readouterr().out
    rank = sum(r for r, *_ in ADAPTERS)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == config["lora_alpha"] == rank and sorted(config["target_modules"]) == ["o_proj", "q_proj",
                                                                                                  "v_proj"]
    assert (out / "adapter_model.safetensors").exists() and f"--max-lora-rank 32" in printed  # 17 -> vLLM's 32
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", FRESH % IDS.tolist(), base, str(out), str(tmp_path / "l.pt")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    fresh = torch.load(tmp_path / "l.pt")
    torch.testing.assert_close(fresh, stacked, atol=ATOL, rtol=0)
    assert not torch.allclose(stacked, logits(load_model(base), IDS), atol=1e-3)  # the adapters matter


def test_export_refuses_a_non_empty_directory_and_a_plain_model(tmp_path, one_thread):
    base, task_dir = write_stack(tmp_path, 1)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("")
    with pytest.raises(SapoError, match="not an empty directory"):
        evaluate.export_main(evaluate.parse_args(["--export-adapter", str(task_dir), str(tmp_path / "busy")]))
    with pytest.raises(SapoError, match="holds no adapter to export"):
        evaluate.export_main(evaluate.parse_args(["--export-adapter", base, str(tmp_path / "new")]))
    assert not (tmp_path / "new").exists()
