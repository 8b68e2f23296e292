"""tasks/fused_ops.py: Liger's fused RMSNorm / SwiGLU / RoPE give the loss and gradients of the plain layers.

Liger's kernels are Triton GPU kernels that do not run on CPU (not even under TRITON_INTERPRET=1), so the exactness
test runs where CUDA and liger-kernel are there (the GPU suite's kernel_tests part carries the wheel); on CPU only the
refusals are checked."""
import sys

import pytest
import torch

from tasks.errors import SapoError
from tasks.fused_ops import apply_fused_ops
from tiny import qv_lora, tiny_model


def test_unknown_fused_ops_and_a_missing_package_are_one_line_errors(monkeypatch):
    net = tiny_model(300)
    with pytest.raises(SapoError, match="--fused-ops fast: must be one of none, liger"):
        apply_fused_ops(net, "fast")
    assert apply_fused_ops(net, "none") == []
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers.monkey_patch", None)  # import fails
    with pytest.raises(SapoError, match="needs the liger-kernel package"):
        apply_fused_ops(net, "liger")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="Liger's Triton kernels need a GPU")
@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_liger_gives_the_loss_and_gradients_of_the_plain_model(arch):
    pytest.importorskip("liger_kernel")
    from tasks.train_batches import build_batch, plan_micro_batches
    from tasks.train_step import SupervisedNLL
    from test_attention_flex import VOCAB, packed_batch

    results = []
    for fused in ("none", "liger"):
        net = tiny_model(VOCAB, arch=arch, seed=5).cuda()
        net.config._attn_implementation = "sdpa"
        apply_fused_ops(net, fused)
        peft_model = qv_lora(net, b_seed=0)
        batch = packed_batch([70, 25, 33, 48, 12, 55], seed=1).to("cuda")
        loss = SupervisedNLL(peft_model, "packed")(batch)
        loss.backward()
        results.append((loss.item(), {n: p.grad.float().cpu() for n, p in peft_model.named_parameters()
                                      if p.grad is not None}))
    (loss0, g0), (loss1, g1) = results
    assert loss1 == pytest.approx(loss0, rel=1e-4)
    assert g0 and set(g0) == set(g1)
    for name in g0:
        assert (g1[name] - g0[name]).abs().max().item() <= 1e-3 * g0[name].abs().max().item(), name
