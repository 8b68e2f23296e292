"""tasks/memory_plan.py: the estimated peak of a training step against the peak measured on CPU, and the auto choice.

The measurement is independent of the estimate: a TorchDispatchMode sees every tensor any op (forward, backward,
optimizer) creates and keeps a weak reference to its storage; live bytes go up at creation and down when the storage
is freed; the peak of that count, plus the parameters held from the start, is the step's peak memory."""
import random
import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from tasks.memory_plan import MARGIN, MemoryEstimate, choose_checkpointing, estimate_training_memory
from tasks.prompts import IGNORE_INDEX, Encoded
from tasks.train_batches import build_batch, plan_micro_batches
from tasks.train_step import SupervisedNLL, set_gradient_checkpointing
from tiny import tiny_model

VOCAB = 300


class LiveBytes(TorchDispatchMode):
    def __init__(self, start: int):
        super().__init__()
        self.live = self.peak = start
        self.refs = {}

    def _free(self, key, n):
        self.live -= n
        self.refs.pop(key, None)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key, n = storage.data_ptr(), storage.nbytes()
                if n and key not in self.refs:
                    self.refs[key] = weakref.ref(storage, lambda _, key=key, n=n: self._free(key, n))
                    self.live += n
                    self.peak = max(self.peak, self.live)
        return out


def training_setup(arch):
    from peft import LoraConfig, get_peft_model

    net = tiny_model(VOCAB, arch=arch, hidden=128, layers=3, seed=1)
    net.config._attn_implementation = "sdpa"
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    peft_model = get_peft_model(net, lora)
    rng = random.Random(0)
    encoded = []
    for n in [300, 250, 200, 180, 150, 120, 100, 90, 60, 40]:
        answer = rng.randint(1, 12)
        ids = [rng.randrange(3, VOCAB) for _ in range(n)]
        encoded.append(Encoded(ids, [IGNORE_INDEX] * (n - answer) + ids[n - answer:], n - answer))
    micro = plan_micro_batches([len(e.input_ids) for e in encoded], 1500, 8, "packed")[0]
    return net, peft_model, build_batch(encoded, micro.rows, 0), micro


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_estimated_peak_is_within_25_percent_of_the_measured_one(arch):
    net, peft_model, batch, micro = training_setup(arch)
    step = SupervisedNLL(peft_model, "packed")
    estimate = estimate_training_memory(step, net, micro.tokens, micro.width, "cpu", head_rows=len(batch.targets))
    for checkpointing in (False, True):
        set_gradient_checkpointing(net, checkpointing)
        peft_model.train()
        optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad])
        meter = LiveBytes(sum(p.numel() * p.element_size() for p in peft_model.parameters()))
        try:
            with meter:
                for _ in range(2):  # the second step holds AdamW's moments too
                    step(batch).backward()
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
        finally:
            set_gradient_checkpointing(net, False)
        ratio = estimate.peak(checkpointing) / meter.peak
        assert 0.75 <= ratio <= 1.25, (checkpointing, estimate.peak(checkpointing), meter.peak)
    assert estimate.peak(True) < estimate.peak(False)


def test_auto_turns_checkpointing_off_only_when_the_estimate_fits():
    estimate = MemoryEstimate(static_bytes=10, activation_bytes_per_token=8.0, layer_input_bytes_per_token=1,
                              layers=4, tokens=100, head_bytes=0, device_bytes=0)
    off = estimate.peak(False)  # 10 + 800 + 0.5 * 200 = 910
    assert off == 910 and estimate.peak(True) == 10 + 400 + 200 + 100
    estimate.device_bytes = int(off / MARGIN) + 1
    assert choose_checkpointing("auto", estimate) is False
    estimate.device_bytes = int(off / MARGIN) - 1
    assert choose_checkpointing("auto", estimate) is True
    assert choose_checkpointing("on", None) is True and choose_checkpointing("off", None) is False
    with pytest.raises(ValueError):
        choose_checkpointing("yes", None)


@pytest.mark.usefixtures("fresh_accelerate_state")
def test_train_sapo_auto_records_its_choice_the_estimate_and_the_peak(tmp_path, capsys):
    import json

    import train_sapo
    from tiny import save_tiny_model_dir

    model_dir = save_tiny_model_dir(tmp_path / "model")
    train_sapo.main(["--model", model_dir, "--sequence", "sentiment", "--select", "original", "--train-instances", "10",
                     "--epochs", "1", "--global-batch-size", "10", "--micro-batch-tokens", "300",
                     "--gradient-checkpointing", "auto", "--eval-instances", "1", "--max-new-tokens", "1",
                     "--output-dir", str(tmp_path / "run")])
    record = json.loads((tmp_path / "run" / "1-sentiment" / "training.json").read_text())
    assert record["gradient_checkpointing"] == "off"  # a tiny model fits any machine's memory
    assert 0 < record["estimated_peak_bytes"] < record["peak_memory_bytes"]  # CPU: the whole process's max RSS
    assert record["peak_memory"] == "process max RSS (CPU)"
    assert "estimated peak memory at" in capsys.readouterr().out
