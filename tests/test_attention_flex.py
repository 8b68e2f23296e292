"""tasks/attention.py: packed rows through FlexAttention with a document mask give the logits, loss and gradients of
the dense 4-D mask through sdpa.

torch runs FlexAttention's backward only on GPUs; on CPU it refuses inputs that require grad, although its eager
implementation (a dense reference computation with autograd) can back-propagate. The gradient test lifts that
refusal (monkeypatched `_validate_device`), so it checks our block mask and the wiring through transformers, not the
CUDA kernel; tests/test_kernel_cuda.py-style checks on a GPU run in the suite (`bash bench/gpu_suite.sh`)."""
import random

import pytest
import torch

from tasks.attention import FLEX_ATTENTION, document_block_mask, set_training_attention
from tasks.prompts import IGNORE_INDEX, Encoded
from tasks.train_batches import build_batch, plan_micro_batches
from tasks.train_step import SupervisedNLL, training_layout
from tiny import qv_lora, tiny_model

VOCAB = 300


def packed_batch(lengths, seed=0):
    rng = random.Random(seed)
    encoded = []
    for n in lengths:
        answer = rng.randint(1, 6)
        ids = [rng.randrange(3, VOCAB) for _ in range(n)]
        encoded.append(Encoded(ids, [IGNORE_INDEX] * (n - answer) + ids[n - answer:], n - answer))
    micro = plan_micro_batches(lengths, 100000, 8, "packed")[0]
    assert any(len(row) > 1 for row in micro.rows)  # several sequences share a row: the mask matters
    return build_batch(encoded, micro.rows, 0)


def test_block_mask_is_the_dense_document_mask():
    from tasks.packing import attention_mask

    batch = packed_batch([150, 40, 60, 37, 90, 9])
    block = document_block_mask(batch.segment_ids, block_size=16)
    dense = attention_mask(batch.segment_ids, batch.position_ids, None, "sdpa", torch.float32)[:, 0]
    rows, width = batch.segment_ids.shape
    # tiles computed = the 16 x 16 tiles holding any allowed (query, key) pair; the others are skipped
    tiles = -(-width // 16)
    padded = torch.zeros(rows, tiles * 16, tiles * 16, dtype=torch.bool)
    padded[:, :width, :width] = dense
    expected = padded.reshape(rows, tiles, 16, tiles, 16).any(4).any(2)
    assert torch.equal(block.to_dense()[:, 0].bool(), expected)
    assert expected.sum() < torch.ones(tiles, tiles).tril().sum() * rows  # fewer tiles than causal attention
    # the BlockMask's mask function, evaluated everywhere, is the scorer's dense mask
    b, q, k = torch.meshgrid(torch.arange(rows), torch.arange(width), torch.arange(width), indexing="ij")
    assert torch.equal(block.mask_mod(b, torch.zeros_like(b), q, k), dense)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="FlexAttention's compiled kernels: CUDA"))])
@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_flex_gives_the_logits_and_gradients_of_the_dense_mask(arch, device, monkeypatch):
    """On CPU: the eager implementation, its backward let through; on CUDA: the compiled kernels, forward and
    backward, as training runs them."""
    net = tiny_model(VOCAB, arch=arch, seed=3).to(device)
    peft_model = qv_lora(net)
    batch = packed_batch([70, 25, 33, 48, 12, 55], seed=1).to(device)
    results = {}
    for attention in ("sdpa", "flex"):
        set_training_attention(net, attention)
        assert training_layout(net) == "packed"
        with torch.no_grad():  # forward only: what FlexAttention runs on CPU as shipped
            hidden = getattr(net, net.base_model_prefix)(
                input_ids=batch.input_ids, position_ids=batch.position_ids,
                attention_mask=(document_block_mask(batch.segment_ids) if attention == "flex" else
                                dense_mask(batch))).last_hidden_state
        logits = net.get_output_embeddings()(hidden)
        if attention == "flex" and device == "cpu":
            monkeypatch.setattr("torch.nn.attention.flex_attention._validate_device", lambda *a: None)
        loss = SupervisedNLL(peft_model, "packed")(batch)
        loss.backward()
        grads = {n: p.grad.cpu() for n, p in peft_model.named_parameters() if p.grad is not None}
        peft_model.zero_grad(set_to_none=True)
        results[attention] = (logits.cpu(), loss.item(), grads)
    assert net.config._attn_implementation == FLEX_ATTENTION
    (l0, loss0, g0), (l1, loss1, g1) = results["sdpa"], results["flex"]
    real = batch.segment_ids.cpu() >= 0  # padding positions attend to padding: compared too, but they are never scored
    assert (l1 - l0)[real].abs().max().item() <= 1e-4 * l0.abs().max().item()
    assert loss1 == pytest.approx(loss0, rel=1e-5)
    assert g0 and set(g0) == set(g1) and all(".lora_" in n for n in g0)
    for name in g0:
        assert (g1[name] - g0[name]).abs().max().item() <= 1e-4 * g0[name].abs().max().item(), name


def dense_mask(batch):
    from tasks.packing import attention_mask

    return attention_mask(batch.segment_ids, batch.position_ids, None, "sdpa", torch.float32)
