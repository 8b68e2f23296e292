"""Sharded launches (FSDP, DeepSpeed ZeRO-3) are refused in one line before anything loads: selection scoring and
generation need the full weights on every process. accelerate 1.15 cannot build an FSDP Accelerator on CPU ("There
are currently no available devices found"; with ACCELERATE_USE_CPU=1 it builds a DDP one instead), so the refusal is
what can be tested here: in-process for every script, and through a real 2-process `accelerate launch --use_fsdp`."""
import pytest

import evaluate
import score_prompts
import train_sapo
from tasks import SapoError
from tasks.launch import check_launch


def test_check_launch_reads_accelerates_environment():
    check_launch("x.py", {})  # DDP / one process: fine
    check_launch("x.py", {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2"})
    with pytest.raises(SapoError, match="x.py does not support FSDP"):
        check_launch("x.py", {"ACCELERATE_USE_FSDP": "true"})
    with pytest.raises(SapoError, match="does not support DeepSpeed ZeRO-3"):
        check_launch("x.py", {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"})


@pytest.mark.parametrize("script,argv", [
    (train_sapo, ["--model", "/nonexistent/model", "--output-dir", "{tmp}/run"]),
    (score_prompts, ["--model", "/nonexistent/model", "--task", "sentiment"]),
    (evaluate, ["--model", "/nonexistent/model", "--tasks", "sentiment"]),
])
def test_every_script_refuses_fsdp_in_one_line_before_loading(script, argv, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(SystemExit) as e:
        script.main([a.replace("{tmp}", str(tmp_path)) for a in argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "does not support FSDP" in err[0]
    assert not (tmp_path / "run").exists()  # refused before the run directory was made


def test_real_two_process_fsdp_launch_is_refused(tmp_path):
    # Through the launcher itself, so the environment it really sets is what is checked (2 CPU processes, gloo).
    import os
    import subprocess
    import sys

    from test_evaluate import free_port

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "-q", "--use_fsdp", "--num_processes",
                           "2", "--main_process_port", str(free_port()), "train_sapo.py",
                           "--output-dir", str(tmp_path / "run")],
                          capture_output=True, text=True, cwd=root, env=env, timeout=300)
    ours = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert proc.returncode != 0
    assert ours and all("train_sapo.py does not support FSDP" in line for line in ours)  # one line per process
    assert not (tmp_path / "run").exists()
