"""Faithful at the paper's scale (issue 12): base weights in bf16 with fp32 scoring sums and fp32 LoRA weights, the
authors' O-LoRA strength, mid-task re-selection on held-out instances with racing's confidence test."""
import copy
import json

import pytest
import torch

import score_prompts
import train_sapo
from tasks.loaders import load_task
from tasks.models import activate_adapters
from tasks.reselection import Reselector
from tiny import save_tiny_model_dir, tiny_model, tiny_tokenizer

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "model")


# ----------------------------------------------------------------------------------------------------------------------
# O-LoRA: the paper preset's strength, counted once per optimizer step


class RecordingAdamW(torch.optim.AdamW):
    """AdamW that keeps a copy of the gradients it is stepped with."""

    steps = []

    def step(self, closure=None):
        RecordingAdamW.steps.append([p.grad.detach().clone() for g in self.param_groups for p in g["params"]])
        return super().step(closure)


def two_adapter_model(tok):
    """A tiny model with a frozen adapter task1 and a trainable task2, every LoRA matrix random (peft starts B at
    zero, which would leave A without a cross-entropy gradient)."""
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    peft_model = get_peft_model(tiny_model(len(tok), seed=1), lora, adapter_name="task1")
    peft_model.add_adapter("task2", lora)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:  # small A: the penalty's gradient (~|A_prev|) and the CE's are of one size
                p.normal_(0.0, 0.001 if "lora_A" in name else 0.1)
    activate_adapters(peft_model, ["task1", "task2"], trainable="task2")
    return peft_model


@pytest.mark.parametrize("micro_batch_size", [1, 4])  # 8 micro-steps as the authors ran, and 2
def test_paper_olora_step_gradient_is_token_mean_ce_plus_4_orth(tmp_path, monkeypatch, micro_batch_size):
    from accelerate import Accelerator

    lambda1 = train_sapo.PRESETS["paper"]["olora_lambda1"]
    assert lambda1 == 4.0  # = the authors' 0.5 on each of 8 micro-batches, never divided by the accumulation
    tok = tiny_tokenizer()
    task = load_task("sentiment", n_train=8)
    config = train_sapo.Config(method="o-lora", olora_lambda1=lambda1, lora_dropout=0.0, global_batch_size=8,
                               micro_batch_size=micro_batch_size, epochs=1, max_grad_norm=1e9,
                               max_source_length=256, max_target_length=32)
    encoded = train_sapo.encode_training_set(tok, task, task.instruction, task.train[:8], config)
    peft_model = two_adapter_model(tok)
    reference = copy.deepcopy(peft_model).double()
    RecordingAdamW.steps = []
    monkeypatch.setattr(torch.optim, "AdamW", RecordingAdamW)
    train_sapo.train_task(Accelerator(), peft_model, "task2", ["task1"], encoded, config, tmp_path, False)
    assert len(RecordingAdamW.steps) == 1
    got = dict(zip([n for n, p in reference.named_parameters() if p.requires_grad], RecordingAdamW.steps[0]))

    # The reference, in float64: one unpadded forward per sequence, the NLL of every supervised token summed over the
    # global batch and divided by their number, plus 4 * sum over modules of |A_task1 A_task2^T| (entries' L1).
    nll, tokens = 0.0, 0
    for e in encoded:
        logits = reference(input_ids=torch.tensor([e.input_ids])).logits[0, :-1]
        labels = torch.tensor(e.labels[1:])
        nll = nll + torch.nn.functional.cross_entropy(logits, labels, ignore_index=-100, reduction="sum")
        tokens += int((labels != -100).sum())
    params = dict(reference.named_parameters())
    orth = sum((params[n.replace(".task2.", ".task1.")] @ p.T).abs().sum()
               for n, p in params.items() if ".lora_A.task2." in n)
    a_name = next(n for n in params if ".lora_A.task2." in n)
    penalty_grad = torch.autograd.grad(lambda1 * orth, params[a_name], retain_graph=True)[0]
    (nll / tokens + lambda1 * orth).backward()
    assert len(got) == 2 * 2 * 2 and all(".task2." in n for n in got)  # A, B of q/v_proj in 2 layers, task2
    for name, grad in got.items():
        want = params[name].grad
        assert torch.allclose(grad.double(), want, rtol=1e-4, atol=1e-6 * float(want.abs().max())), name
    # Both parts weigh in: the penalty's gradient is neither negligible nor all of it.
    ce_grad = params[a_name].grad - penalty_grad
    assert 0.1 < float(penalty_grad.norm() / ce_grad.norm()) < 10.0


# ----------------------------------------------------------------------------------------------------------------------
# Precision: base weights in bf16, scoring sums in fp32, LoRA weights in fp32

# bf16 keeps 8 significant bits: each weight and activation is rounded with a relative error up to 2^-9, and the tiny
# model's 2 layers compound that to a few 2^-9 on the logits. The NLL itself is summed in fp32 (segment_nll upcasts
# after the LM head's matmul; tests/test_kernels.py checks that part against float64 at 1e-4), so the score of a
# candidate, a mean over many tokens whose rounding errors partly cancel, stays within 2^-8 of its fp32 value,
# relative (seen: 3e-4). Deeper models compound more: SmolLM2-135M's 30 layers gave up to 1.4% on the built-in
# sentiment pool (this CPU), with the same pick and ranking.
BF16_REL = 2.0 ** -8


def test_bf16_scores_are_close_to_fp32_and_pick_the_same_on_a_clear_cut_pool():
    tok = tiny_tokenizer()
    fp32 = tiny_model(len(tok), seed=3)
    bf16 = copy.deepcopy(fp32).to(torch.bfloat16)
    task = load_task("sentiment", n_train=8)
    pool = [task.instruction] + list(task.paraphrases)
    instances = task.train[:8]
    full = score_prompts.score_candidates(fp32, tok, task, pool, instances, progress=False)
    half = score_prompts.score_candidates(bf16, tok, task, pool, instances, progress=False)
    for a, b in zip(full.candidates, half.candidates):
        assert b.score == pytest.approx(a.score, rel=BF16_REL)
        assert b.score != a.score  # the bf16 model really ran
    # A clear-cut pool: the fp32 best and every candidate more than two tolerances above it.
    scores = [c.score for c in full.candidates]
    best = full.selected
    clear = [best] + [c for c, s in enumerate(scores) if s > scores[best] * (1 + 2 * BF16_REL)]
    assert len(clear) >= 5
    picks = [score_prompts.score_candidates(m, tok, task, [pool[c] for c in clear], instances, progress=False).selected
             for m in (fp32, bf16)]
    assert picks == [0, 0]


def test_score_prompts_dtype_flag_records_it_and_keeps_caches_apart(model_dir, tmp_path, capsys):
    common = ["--model", model_dir, "--task", "sentiment", "--instances", "4", "--max-candidates", "3",
              "--no-progress", "--max-length", "256"]
    score_prompts.main([*common, "--dtype", "fp32", "--output", str(tmp_path / "fp32.json")])
    score_prompts.main([*common, "--dtype", "bf16", "--output", str(tmp_path / "bf16.json")])  # same cache file
    fp32 = json.loads((tmp_path / "fp32.json").read_text())
    bf16 = json.loads((tmp_path / "bf16.json").read_text())
    assert (fp32["dtype"], bf16["dtype"]) == ("torch.float32", "torch.bfloat16")
    assert not any(c["cached"] for c in bf16["candidates"])  # fp32 scores are not served for bf16
    assert [c["score"] for c in bf16["candidates"]] == pytest.approx([c["score"] for c in fp32["candidates"]],
                                                                      rel=BF16_REL)
    with pytest.raises(SystemExit):
        score_prompts.main([*common, "--dtype", "fp8"])
    assert "--dtype" in capsys.readouterr().err


def test_training_on_bf16_base_weights_keeps_lora_in_fp32(model_dir, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "run"
    train_sapo.main(["--model", model_dir, "--output-dir", str(out), "--dtype", "bf16", "--sequence", "sentiment",
                     "--score-instances", "4", "--max-candidates", "3", "--train-instances", "16", "--epochs", "2",
                     "--global-batch-size", "8", "--micro-batch-size", "4", "--eval-instances", "4",
                     "--max-new-tokens", "4", "--lr", "5e-3"])
    assert json.loads((out / "config.json").read_text())["dtype"] == "bf16"
    assert json.loads((out / "1-sentiment" / "selection.json").read_text())["dtype"] == "torch.bfloat16"
    weights = load_file(str(out / "1-sentiment" / "adapter" / "adapter_model.safetensors"))
    assert weights and all(w.dtype == torch.float32 for w in weights.values())
    assert any(float(w.abs().max()) > 0 for n, w in weights.items() if "lora_B" in n)  # B starts at zero: trained
    losses = [json.loads(line)["loss"] for line in (out / "1-sentiment" / "train_log.jsonl").read_text().splitlines()]
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
    with pytest.raises(SystemExit):
        train_sapo.main(["--model", model_dir, "--output-dir", str(tmp_path / "x"), "--dtype", "half"])


# ----------------------------------------------------------------------------------------------------------------------
# Mid-task re-selection (ours): held-out instances, racing's paired test, the shortlist's pool indices recorded

T_95_DOF_7 = 1.894579  # one-sided Student-t quantile, 0.95, 7 degrees of freedom (statistical tables)


def crafted_selection(per_instance: dict[int, list[float]], counts: list[int]):
    """A Selection of the shortlist with the given per-instance NLL sums (what the scorer would return)."""
    candidates = [score_prompts.CandidateScore.from_sums(c, f"instruction {c}", sums, counts)
                  for c, sums in sorted(per_instance.items())]
    best = min(range(len(candidates)), key=lambda c: candidates[c].score)
    return score_prompts.Selection(task="t", method="sapo", selected=best, instruction=candidates[best].instruction,
                                   candidates=candidates)


def reselector_over(per_instance, counts, current=0, rescorings=1):
    shortlist = [f"instruction {c}" for c in sorted(per_instance)]
    return Reselector(lambda *args: crafted_selection(per_instance, counts), shortlist, [7, 3, 11][:len(shortlist)],
                      [None] * 8, shortlist[current], train_sapo.Config(race_confidence=0.95),
                      lambda text: ["encoded: " + text], rescorings)


def test_reselection_keeps_the_instruction_on_a_difference_below_the_noise():
    counts = [4] * 8
    noise = [0.9, -1.1, 0.4, -0.2, 1.3, -0.8, 0.1, -0.6]  # per-instance sums: +-0.3 NLL per token
    current = [4 * 4.832 + e for e in noise]
    other = [4 * 4.829 + e + d for e, d in zip(noise, [0.5, -0.4, 0.3, -0.6, 0.2, 0.1, -0.3, 0.2])]
    reselect = reselector_over({0: current, 1: other}, counts)
    assert reselect(None, 5) is None and reselect.current == "instruction 0"
    event = reselect.events[0]
    assert event.best == 3 and event.current == 7 and not event.switched  # pool indices, not shortlist positions
    d = [(a - b) / 4 for a, b in zip(current, other)]  # by hand: mean - t * sd / sqrt(n)
    mean = sum(d) / 8
    sd = (sum((x - mean) ** 2 for x in d) / 7) ** 0.5
    assert event.z == pytest.approx(T_95_DOF_7, rel=1e-6)
    assert event.lower_bound == pytest.approx(mean - T_95_DOF_7 * sd / 8 ** 0.5, rel=1e-6) and event.lower_bound < 0


def test_reselection_switches_when_the_best_is_confidently_better():
    counts = [4] * 8
    noise = [0.9, -1.1, 0.4, -0.2, 1.3, -0.8, 0.1, -0.6]
    current = [4 * 4.8 + e for e in noise]
    better = [4 * 4.3 + e + d for e, d in zip(noise, [0.1, -0.1, 0.05, 0.0, -0.05, 0.1, -0.1, 0.0])]
    worse = [4 * 5.5 + e for e in noise]
    # Three candidates, two re-scorings planned: 2 x 2 comparisons share the 5% (t at 1 - 0.05/4).
    from tasks.racing import student_t_quantile

    reselect = reselector_over({0: current, 1: better, 2: worse}, counts, rescorings=2)
    assert reselect(None, 4) == ["encoded: instruction 1"] and reselect.current == "instruction 1"
    event = reselect.events[0]
    assert (event.current, event.best, event.switched) == (7, 3, True)
    assert event.candidates == [7, 3, 11] and event.scores == pytest.approx([4.8, 4.3, 5.5], abs=0.05)
    assert event.z == pytest.approx(student_t_quantile(1 - 0.05 / 4, 7)) and event.lower_bound > 0
    assert reselect(None, 8) is None  # already training with the best: nothing to test
    assert reselect.events[1].lower_bound is None and not reselect.events[1].switched


def test_reselection_scores_on_held_out_instances_and_refuses_when_there_are_none():
    task = load_task("sentiment", n_train=20)
    config = train_sapo.Config(train_instances=12, score_instances=6)
    held_out = train_sapo.reselection_instances(task, "train", config)
    assert held_out == task.train[12:18]  # after the training instances: never trained on
    short = load_task("sentiment", n_train=13)
    with pytest.raises(train_sapo.SapoError, match="--reselect-every.*--train-instances 12.*has 13, leaving 1"):
        train_sapo.reselection_instances(short, "train", config)


def test_reselector_on_a_real_scorer_tests_the_scored_per_instance_sums():
    from accelerate import Accelerator

    tok = tiny_tokenizer()
    model = tiny_model(len(tok), seed=3)
    task = load_task("sentiment", n_train=16)
    shortlist = [task.instruction] + list(task.paraphrases[:2])
    held_out = task.train[8:16]
    config = train_sapo.Config(score_token_budget=4096, max_source_length=256, max_target_length=32)
    scored = score_prompts.score_candidates(model, tok, task, shortlist, held_out, progress=False).candidates
    worst = max(range(3), key=lambda c: scored[c].score)
    best = min(range(3), key=lambda c: scored[c].score)
    def score(model, instructions, instances):  # as train_sapo.make_reselector binds it
        return score_prompts.select_candidates(model, tok, task, instructions, instances, Accelerator(),
                                               score_prompts.ScoringSettings.of(config), progress=False)

    reselect = Reselector(score, shortlist, [0, 5, 9], held_out, shortlist[worst], config,
                          lambda text: ["encoded: " + text], rescorings=1)
    switched = reselect(model, 2) is not None
    event = reselect.events[0]
    assert event.scores == pytest.approx([c.score for c in scored], rel=1e-6)
    assert (event.current, event.best) == ([0, 5, 9][worst], [0, 5, 9][best])
    # By hand: per-token paired differences worst - best on the 8 instances, t at 1 - 0.05 / 2 (2 comparisons).
    per_token = sum(scored[best].instance_counts) / 8
    d = [(a - b) / per_token for a, b in zip(scored[worst].instance_sums, scored[best].instance_sums)]
    mean = sum(d) / 8
    sd = (sum((x - mean) ** 2 for x in d) / 7) ** 0.5
    t_975_dof_7 = 2.364624  # statistical tables
    assert event.lower_bound == pytest.approx(mean - t_975_dof_7 * sd / 8 ** 0.5, rel=1e-5, abs=1e-6)
    assert switched == event.switched == (event.lower_bound > 0)
    assert reselect.current == shortlist[best if switched else worst]
