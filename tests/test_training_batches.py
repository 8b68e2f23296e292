"""Training micro-batches (tasks/train_batches.py) and the training forward (tasks/train_step.py) against today's
reference path: a padded batch through the plain HF forward, full fp32 logits, summed cross-entropy on the shifted
labels, autograd. Packing, the head on supervised rows, the grouping into micro-batches and gradient checkpointing
must all give that loss and that gradient."""
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tasks import IGNORE_INDEX, pad_batch
from tasks.prompts import Encoded
from tasks.train_batches import LAYOUTS, build_batch, my_micro_batches, plan_micro_batches, supervised_tokens
from tasks.train_step import SupervisedNLL, head_nll, set_gradient_checkpointing
from tiny import qv_lora, save_tiny_model_dir, tiny_model

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 300


def sequences(lengths, seed=0):
    """Encoded sequences of the given lengths: a prompt, then a response of 1 to 12 supervised tokens."""
    rng = random.Random(seed)
    out = []
    for n in lengths:
        answer = min(n - 1, rng.randint(1, 12))
        ids = [rng.randrange(3, VOCAB) for _ in range(n)]
        out.append(Encoded(ids, [IGNORE_INDEX] * (n - answer) + ids[n - answer:], n - answer))
    return out


def reference_loss(model, encoded, indices):
    """Today's path: right padding, full logits in fp32, summed CE over the shifted labels."""
    ids = pad_batch([encoded[i].input_ids for i in indices], 0)
    labels = pad_batch([encoded[i].labels for i in indices], IGNORE_INDEX)
    mask = pad_batch([[1] * len(encoded[i].input_ids) for i in indices], 0)
    logits = model(input_ids=ids, attention_mask=mask).logits.float()
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1),
                                             ignore_index=IGNORE_INDEX, reduction="sum")


def gradients(model):
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


def step_loss_and_grads(model, encoded, plan, layout, batch):
    """Summed NLL of every micro-batch of `plan`, backward after each (gradient accumulation)."""
    step = SupervisedNLL(model, layout)
    total = 0.0
    for micro in plan:
        loss = step(build_batch(encoded, [[batch[p] for p in row] for row in micro.rows], pad_id=0))
        loss.backward()
        total += loss.item()
    return total, gradients(model)


def assert_same_grads(got, expected, rel=1e-5):
    assert set(got) == set(expected)
    for name in expected:
        scale = expected[name].abs().max().item()
        assert (got[name] - expected[name]).abs().max().item() <= rel * scale + 1e-12, name


# ----------------------------------------------------------------------------------------------------------------------
# Planning: pure functions of the lengths.

def test_plan_covers_every_sequence_once_within_the_budget():
    rng = random.Random(1)
    for trial in range(30):
        lengths = [rng.choice([rng.randint(5, 60), rng.randint(100, 600)]) for _ in range(rng.randint(1, 70))]
        budget = rng.choice([0, 256, 700, 2048, 100000])
        for layout in LAYOUTS:
            plan = plan_micro_batches(lengths, budget, 8, layout)
            positions = [p for micro in plan for row in micro.rows for p in row]
            assert sorted(positions) == list(range(len(lengths)))
            for micro in plan:
                widths = [sum(lengths[p] for p in row) for row in micro.rows]
                assert micro.width == max(widths)
                if layout == "varlen":
                    assert len(micro.rows) == 1
                if layout == "padded":
                    assert all(len(row) == 1 for row in micro.rows)
                if layout == "packed":  # no row holds more than the longest sequence of its group, unless alone
                    assert all(len(row) == 1 or w <= max(lengths) for row, w in zip(micro.rows, widths))
                if budget == 0:
                    assert micro.num_sequences <= 8
                elif micro.tokens > budget:  # over budget only when it cannot be split
                    assert len(micro.rows) == 1 and (layout != "varlen" or len(micro.rows[0]) == 1)
            assert plan == plan_micro_batches(list(lengths), budget, 8, layout)  # deterministic


def test_packing_removes_padding():
    lengths = [500, 20, 30, 450, 200, 250, 50]
    packed = plan_micro_batches(lengths, 2000, 0, "packed")
    padded = plan_micro_batches(lengths, 4000, 0, "padded")
    # First-fit decreasing into rows of 500 tokens: 500 | 450 + 50 | 250 + 200 + 30 + 20, three full rows.
    assert [m.rows for m in packed] == [[[0], [3, 6], [5, 4, 2, 1]]]
    assert sum(m.tokens for m in packed) == 1500
    assert sum(m.tokens for m in padded) == 7 * 500
    assert [m.tokens for m in plan_micro_batches(lengths, 2000, 0, "varlen")] == [sum(lengths)]


@pytest.mark.parametrize("world", [1, 2, 3, 5])
def test_processes_share_a_plan_with_equal_backward_passes(world):
    plan = plan_micro_batches([100, 90, 80, 70, 60, 50, 40], 160, 0, "padded")
    shares = [my_micro_batches(plan, rank, world) for rank in range(world)]
    assert len({len(s) for s in shares}) == 1  # every process runs the same number of backward passes
    got = sorted((i, id(m)) for s in shares for i, m in s if m is not None)
    assert got == [(i, id(m)) for i, m in enumerate(plan)]
    assert all(m is None for s in shares for i, m in s if i >= len(plan))


# ----------------------------------------------------------------------------------------------------------------------
# The forward: loss and gradient against today's padded full-logits path.

@pytest.fixture(scope="module")
def model():
    net = tiny_model(VOCAB, arch="qwen3", seed=5)
    net.config._attn_implementation = "sdpa"
    return net.eval()  # dropout off


def test_head_nll_matches_float64_with_scale_and_softcap():
    g = torch.Generator().manual_seed(0)
    hidden, weight, bias = torch.randn(7, 16, generator=g), torch.randn(50, 16, generator=g), torch.randn(50, generator=g)
    targets = torch.randint(0, 50, (7,), generator=g)
    z = (hidden.double() @ weight.double().T + bias.double()) * 0.5
    z = 30.0 * torch.tanh(z / 30.0)
    expected = (torch.logsumexp(z, 1) - z[torch.arange(7), targets]).sum()
    got = head_nll(hidden, weight, bias, targets, logit_scale=0.5, softcap=30.0)
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)


@pytest.mark.parametrize("layout,budget", [("packed", 0), ("packed", 300), ("packed", 100000), ("padded", 400),
                                           ("varlen", 300)])
def test_packed_step_gives_the_padded_steps_loss_and_gradient(model, layout, budget, monkeypatch):
    """varlen on this sdpa model: no mask is passed; transformers derives the block-diagonal mask from the restarting
    position ids of the one row (masking_utils.find_packed_sequence_indices), and ignores the cu_seq_lens that
    flash-attention's varlen kernel would take. Flash attention itself does not run on CPU."""
    encoded = sequences([3, 150, 9, 60, 141, 22, 5, 98, 37, 120])
    batch = [7, 2, 0, 9, 4, 1, 8, 3, 6, 5]  # positions in `encoded`, shuffled as a global batch is
    expected_loss = reference_loss(model, encoded, batch)
    expected_loss.backward()
    expected = gradients(model)
    plan = plan_micro_batches([len(encoded[i].input_ids) for i in batch], budget, 4, layout)
    assert len(plan) > 1 or budget == 100000
    if budget == 100000:  # one micro-batch: the head runs in several checkpointed chunks
        monkeypatch.setattr("tasks.train_step.HEAD_CHUNK_ELEMENTS", 5 * VOCAB)
    loss, got = step_loss_and_grads(model, encoded, plan, layout, batch)
    assert loss == pytest.approx(expected_loss.item(), rel=1e-5)
    assert_same_grads(got, expected)
    labels = pad_batch([encoded[i].labels for i in batch], IGNORE_INDEX)
    assert supervised_tokens(encoded, batch) == (labels[:, 1:] != IGNORE_INDEX).sum().item()


def test_checkpointing_with_peft_keeps_the_gradient(model):
    net = tiny_model(VOCAB, arch="llama", seed=6)
    net.config._attn_implementation = "sdpa"
    peft_model = qv_lora(net)
    peft_model.train()  # checkpointing is active in training mode only; every dropout is 0 here
    encoded = sequences([40, 7, 90, 25, 61], seed=3)
    batch = [4, 0, 3, 1, 2]
    reference_loss(peft_model, encoded, batch).backward()
    expected = gradients(peft_model)
    assert expected and all(".lora_" in n for n in expected)
    plan = plan_micro_batches([len(encoded[i].input_ids) for i in batch], 120, 0, "packed")
    set_gradient_checkpointing(net, True)
    try:
        _, got = step_loss_and_grads(peft_model, encoded, plan, "packed", batch)
    finally:
        set_gradient_checkpointing(net, False)
    assert_same_grads(got, expected)


# ----------------------------------------------------------------------------------------------------------------------
# train_sapo end to end: 1 and 2 processes, token budget, dropout on.

@pytest.mark.usefixtures("fresh_accelerate_state")
def test_budget_run_is_the_same_on_one_and_two_processes(tmp_path):
    """Dropout on (LoRA's 0.1), checkpointing on, several micro-batches per process (no_sync, then one reduction)."""
    import train_sapo

    model_dir = save_tiny_model_dir(tmp_path / "model")
    flags = ["--model", model_dir, "--sequence", "sentiment", "--select", "original", "--train-instances", "20",
             "--epochs", "1", "--global-batch-size", "10", "--micro-batch-tokens", "300", "--gradient-checkpointing",
             "--eval-instances", "1", "--max-new-tokens", "1", "--lr", "5e-3"]
    train_sapo.main([*flags, "--output-dir", str(tmp_path / "p1")])
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
    two = subprocess.run([str(Path(sys.executable).parent / "accelerate"), "launch", "--num_processes", "2",
                          "--multi_gpu", "--main_process_port", "29531", "train_sapo.py", *flags,
                          "--output-dir", str(tmp_path / "p2")], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    logs = [[json.loads(x)["loss"] for x in (tmp_path / p / "1-sentiment" / "train_log.jsonl").read_text().splitlines()]
            for p in ("p1", "p2")]
    assert len(logs[0]) == 2 and logs[0] == pytest.approx(logs[1], rel=1e-5)
    records = [json.loads((tmp_path / p / "1-sentiment" / "training.json").read_text()) for p in ("p1", "p2")]
    assert records[0]["accumulation"] >= 3 and records[1]["accumulation"] >= 2  # ~100-token sequences, 300 a forward


def test_a_checkpoint_with_other_weight_names_is_refused(tmp_path):
    """A checkpoint of the peft model itself (names without SupervisedNLL's "model." prefix, as written before it)
    would load nothing under strict=False and resume with untrained weights: refused in one line."""
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import save_file

    from tasks import SapoError
    from tasks.checkpoints import check_checkpoint_keys

    peft_model = get_peft_model(tiny_model(VOCAB, seed=7), LoraConfig(r=2, target_modules=["q_proj"]))
    step = SupervisedNLL(peft_model, "packed")
    trained = {n: p.detach().clone() for n, p in step.named_parameters() if p.requires_grad}
    save_file(trained, str(tmp_path / "model.safetensors"))
    check_checkpoint_keys(step, tmp_path)  # its own names: accepted
    save_file({n.removeprefix("model."): p for n, p in trained.items()}, str(tmp_path / "model.safetensors"))
    with pytest.raises(SapoError, match="holds none of the weights being trained"):
        check_checkpoint_keys(step, tmp_path)
