"""bench/bench_kernel.py's bookkeeping on CPU (tiny sizes; timings are never checked): a provider that fails is
recorded with its error and the sweep goes on, every row reaches the CSV, FLOPs count the rows each provider really
multiplies, and a provider's errors are measured against the float64 reference."""

import csv
import importlib.util
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_kernel", os.path.join(ROOT, "bench", "bench_kernel.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_failing_provider_is_recorded_and_the_sweep_goes_on(tmp_path, monkeypatch):
    bench = load_bench()
    real = bench.providers

    def with_broken(device, ours_configs=()):
        out = real(device, ours_configs)
        def broken(b):
            raise RuntimeError("kernel exploded\nsecond line")
        # first in the sweep, so that every other provider runs after it
        return {"broken": (broken, "R"), **out}

    monkeypatch.setattr(bench, "providers", with_broken)
    out = tmp_path / "k.csv"
    monkeypatch.setattr(sys, "argv", ["bench_kernel.py", "--cpu", "--heads", "cpu-256x8k", "--rows", "8,16",
                                      "--fractions", "1.0,0.5", "--out", str(out)])
    torch.manual_seed(0)
    with torch.enable_grad():  # main() turns autograd off for the process; give the later tests their state back
        bench.main()
    assert torch.is_grad_enabled()
    rows = list(csv.DictReader(open(out)))
    # 2 row counts x 2 fractions x (broken + naive + torch_chunked + mm_ceiling), in sweep order
    assert [r["provider"] for r in rows] == ["broken", "naive", "torch_chunked", "mm_ceiling"] * 4
    for r in rows:
        R, T = int(r["R"]), int(r["T"])
        if r["provider"] == "broken":
            assert r["status"] == "error: RuntimeError: kernel exploded" and r["ms"] == ""
            continue
        assert r["status"] == "ok" and float(r["ms"]) > 0
        # FLOPs = the rows the provider multiplies: all T for naive, the R scored rows otherwise
        assert int(r["rows_computed"]) == (T if r["provider"] == "naive" else R)
        flops = 2 * int(r["rows_computed"]) * int(r["H"]) * int(r["V"])
        expected = flops / (float(r["ms"]) * 1e-3) / 1e12
        assert abs(float(r["tflops_performed"]) - expected) <= 1e-9 * expected
        if r["provider"] != "mm_ceiling":
            assert float(r["max_abs_err"]) < 1e-4 and r["top1_agree"] == "1"  # fp32 on CPU against float64


def test_ours_configs_by_value_or_by_name():
    from kernels.segment_nll_triton import SM90_TWO_CTA_CONFIGS

    bench = load_bench()
    assert bench.parse_config("BLOCK_N=256; num_stages=4") == {"BLOCK_N": 256, "num_stages": 4}
    for name, cfg in SM90_TWO_CTA_CONFIGS.items():
        got = bench.parse_config(f" {name} ")
        assert got == cfg
    # on a GPU each named candidate is its own provider next to the default (built here, never launched)
    provs = bench.providers(torch.device("cuda"), ["one_warpgroup", "BLOCK_N=128"])
    assert {"ours_triton", "ours_triton[one_warpgroup]", "ours_triton[BLOCK_N=128]"} <= set(provs)
