"""probe_prompts.py and tasks/statistics.py: every indicator against a direct computation, the statistics against numpy
and hand computations, the pool-size curve on a hand-made table, one tiny study end to end, its resume (nothing
recomputed) and refusal of changed settings; train_sapo's --select fixed:K."""
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import evaluate
import probe_prompts
import score_prompts
import train_sapo
from tasks import IGNORE_INDEX
from tasks.loaders import load_task
from tasks.prompts import encode_task_example
from tasks.statistics import (average_ranks, bootstrap_interval, flesch_kincaid_grade, pearson, relative_change,
                              spearman, syllables)
from tiny import save_tiny_model_dir, tiny_model, tiny_tokenizer

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")

SMALL = ["--pairs", "sentiment->topic", "--unseen", "animal", "--max-candidates", "3", "--score-instances", "4",
         "--train-instances", "8", "--epochs", "1", "--global-batch-size", "4", "--micro-batch-size", "4",
         "--eval-instances", "4", "--max-new-tokens", "4", "--zero-shot-instances", "2", "--gradient-instances", "4",
         "--bootstrap", "50", "--pool-subsets", "10", "--max-source-length", "256", "--max-target-length", "16",
         "--lr", "5e-3", "--eval-batch-size", "4"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "model")


# ----------------------------------------------------------------------------------------------------------------------
# Statistics


def test_relative_change_by_hand():
    assert relative_change(30.0, 20.0) == 0.5
    assert relative_change(15.0, 20.0) == -0.25
    assert math.isnan(relative_change(5.0, 0.0))  # undefined against a zero score, not an exception
    pair = probe_prompts.PairResult("a", "b", ["u"], ["orig", "p1", "p2"], [probe_prompts.Indicators()] * 3,
                                    [{"a": 40.0, "b": 50.0, "u": 0.0}, {"a": 50.0, "b": 50.0, "u": 10.0},
                                     {"a": 30.0, "b": 55.0, "u": 0.0}], [])
    assert pair.relative("a") == [0.0, 0.25, -0.25]
    assert pair.relative("b") == [0.0, 0.0, 0.1]
    assert all(math.isnan(x) for x in pair.relative("u"))
    # Cross-task performance: the mean over T1 and U of the defined relative changes (u is undefined here).
    assert probe_prompts.cross_task_performance(pair) == [0.0, 0.25, -0.25]
    spread = pair.spread()  # population std over the paraphrases (candidates 1, 2)
    assert list(spread) == ["b", "a", "u"] and spread["a"] == pytest.approx(0.25) and \
        spread["b"] == pytest.approx(0.05) and math.isnan(spread["u"])


def test_correlations_against_numpy_and_ties_by_hand():
    x = [3.0, 1.0, 4.0, 1.0, 5.0, 9.0, 2.0, 6.0]
    y = [2.7, 1.8, 2.8, 1.8, 2.9, 3.1, 4.0, 2.2]
    assert pearson(x, y) == pytest.approx(np.corrcoef(x, y)[0, 1], abs=1e-12)
    # Ties get the mean of the ranks they occupy: x's two 1.0 share ranks 1 and 2, y's two 1.8 likewise.
    rx = [4, 1.5, 5, 1.5, 6, 8, 3, 7]
    ry = [4, 1.5, 5, 1.5, 6, 7, 8, 3]
    assert average_ranks(x).tolist() == rx and average_ranks(y).tolist() == ry
    assert spearman(x, y) == pytest.approx(np.corrcoef(rx, ry)[0, 1], abs=1e-12)
    assert average_ranks([10, 20, 20, 30]).tolist() == [1, 2.5, 2.5, 4]
    assert average_ranks([7, 7, 7]).tolist() == [2, 2, 2]
    assert math.isnan(pearson([1, 1, 1], [1, 2, 3])) and math.isnan(spearman([2, 2], [1, 3]))
    assert spearman([1, 2, 3, 4], [10, 20, 30, 1000]) == pytest.approx(1.0)


def test_bootstrap_interval_resamples_within_groups():
    data = np.arange(20.0)
    low, high = bootstrap_interval(lambda idx: float(data[idx[0]].mean()), [20], resamples=400, seed=1)
    assert low < data.mean() < high and high - low < 10
    # The same draws as a direct loop over numpy's generator (one array per group, drawn in order).
    rng = np.random.default_rng(3)
    direct = []
    for _ in range(50):
        a, b = rng.integers(0, 4, size=4), rng.integers(0, 6, size=6)
        direct.append(float(a.sum() + 10 * b.sum()))
    low, high = bootstrap_interval(lambda idx: float(idx[0].sum() + 10 * idx[1].sum()), [4, 6], resamples=50, seed=3)
    assert (low, high) == pytest.approx(tuple(np.quantile(direct, [0.025, 0.975])))
    assert bootstrap_interval(lambda idx: 2.0, [5], resamples=10) == (2.0, 2.0)


def test_readability_on_sentences_with_known_counts():
    for word, n in [("cat", 1), ("the", 1), ("make", 1), ("table", 2), ("whole", 1), ("review", 2), ("answer", 2),
                    ("classify", 3), ("positive", 3), ("negative", 3), ("sentence", 2), ("instruction", 3)]:
        assert syllables(word) == n, word
    # 1 sentence, 6 words, 6 syllables.
    assert flesch_kincaid_grade("The cat sat on the mat.") == pytest.approx(0.39 * 6 + 11.8 * 1 - 15.59)
    # 2 sentences, 7 words: Classify(3) the(1) review(2) / Answer(2) positive(3) or(1) negative(3) = 15 syllables.
    assert flesch_kincaid_grade("Classify the review. Answer positive or negative") == \
        pytest.approx(0.39 * 7 / 2 + 11.8 * 15 / 7 - 15.59)
    assert math.isnan(flesch_kincaid_grade("1 2 3"))


def test_pool_size_curve_on_a_hand_made_table():
    losses = [3.0, 1.0, 2.0, 4.0]  # candidate 1 has the lowest pre-update loss, then 2, then the original
    performance = [0.0, 10.0, 5.0, -5.0]
    curve = probe_prompts.pool_size_curve(losses, performance, [1, 2, 3, 4], subsets=100, seed=0)
    # Every pool holding the original: k=2 -> {0,1} picks 1, {0,2} picks 2, {0,3} picks 0; k=3 -> {0,1,2} 1,
    # {0,1,3} 1, {0,2,3} 2.
    assert [(p.k, p.pools, p.picks) for p in curve] == [(1, 1, [0.0]), (2, 3, [10.0, 5.0, 0.0]),
                                                        (3, 3, [10.0, 10.0, 5.0]), (4, 1, [10.0])]
    sampled = probe_prompts.pool_size_curve(losses, performance, [2], subsets=2, seed=0)[0]  # 3 pools > 2: sampled
    assert sampled.pools == 2 and set(sampled.picks) <= {10.0, 5.0, 0.0}
    assert probe_prompts.pool_sizes(8) == [1, 2, 4, 8] and probe_prompts.pool_sizes(21) == [1, 2, 4, 8, 16, 21]


def test_indicator_correlations_and_matrices_on_a_hand_made_pair():
    config = probe_prompts.ProbeConfig(bootstrap=100)
    losses = [2.0, 1.0, 3.0, 1.5, 2.5]
    scores = [{"t1": 50 - 10 * l, "u1": 30 - 4 * l * l, "u2": 10.0 + (c % 2), "t2": 60.0}
              for c, l in enumerate(losses)]
    indicators = [probe_prompts.Indicators(pre_update_loss=l, length_tokens=float(c)) for c, l in enumerate(losses)]
    pair = probe_prompts.PairResult("t1", "t2", ["u1", "u2"], [f"p{c}" for c in range(5)], indicators, scores, [])
    # Signed pre-update loss (-loss) against each cross task's scores, averaged over the tasks.
    expected = np.mean([spearman([-l for l in losses], pair.scores_on(t)) for t in ("t1", "u1", "u2")])
    assert probe_prompts.indicator_correlation(pair, "pre_update_loss", spearman) == pytest.approx(expected)
    assert spearman([-l for l in losses], pair.scores_on("t1")) == pytest.approx(1.0)
    summary = probe_prompts.summarize_indicators([pair], config)["pre_update_loss"]
    assert summary.mean == pytest.approx(expected) and summary.low <= summary.high
    assert summary.spearman == {"t1->t2": pytest.approx(expected)} and summary.sign == -1
    # Two pairs: the mean of the pairs' values; the interval resamples pairs and candidates.
    reversed_pair = probe_prompts.PairResult("t1", "t3", ["u1", "u2"], pair.candidates, indicators[::-1], scores, [])
    second = probe_prompts.indicator_correlation(reversed_pair, "pre_update_loss", spearman)
    both = probe_prompts.summarize_indicators([pair, reversed_pair], config)["pre_update_loss"]
    assert both.mean == pytest.approx((expected + second) / 2) and both.low <= both.high
    assert set(both.spearman) == {"t1->t2", "t1->t3"}
    matrix = probe_prompts.correlation_matrix([pair.scores_on(t) for t in pair.cross_tasks], pair.cross_tasks,
                                              pearson, config)
    assert np.allclose(matrix.matrix, np.corrcoef([pair.scores_on(t) for t in pair.cross_tasks]))
    off = [matrix.matrix[i][j] for i in range(3) for j in range(3) if i != j]
    assert matrix.mean_off_diagonal() == pytest.approx(np.mean(off))


# ----------------------------------------------------------------------------------------------------------------------
# Indicators against direct computations on a tiny model


@pytest.fixture(scope="module")
def tiny():
    tok = tiny_tokenizer()
    return tok, tiny_model(len(tok), seed=2), load_task("sentiment", n_train=6)


def test_token_statistics_match_a_plain_unpadded_forward(tiny):
    from accelerate import Accelerator

    tok, model, task = tiny
    encoded = [encode_task_example(tok, task, task.instruction, x, 256) for x in task.train[:5]]
    stats = probe_prompts.token_statistics(model, encoded, Accelerator(cpu=True), batch_size=3)  # padded batches
    for e, (nll, entropy) in zip(encoded, stats):
        with torch.no_grad():
            logits = model(torch.tensor([e.input_ids])).logits[0].double()
        positions = [j for j, t in enumerate(e.labels) if t != IGNORE_INDEX and j > 0]
        p = torch.softmax(logits, -1)
        expected_nll = [-math.log(float(p[j - 1, e.labels[j]])) for j in positions]
        expected_entropy = [-float((p[j - 1] * p[j - 1].log()).sum()) for j in positions]
        assert nll == pytest.approx(expected_nll, rel=1e-4) and entropy == pytest.approx(expected_entropy, rel=1e-4)
    # The first response token's loss is the first entry; the token-weighted mean NLL is SAPO's score.
    reference = score_prompts.reference_score(model, tok, task, task.instruction, task.train[:5], 256)
    assert sum(sum(n) for n, _ in stats) / sum(len(n) for n, _ in stats) == pytest.approx(reference.score, rel=1e-4)


def test_instruction_sequence_labels_exactly_the_instruction(tiny):
    tok, model, task = tiny
    e = probe_prompts.instruction_sequence(tok, task, task.instruction)
    labelled = [t for t in e.labels if t != IGNORE_INDEX]
    assert tok.decode(labelled) == task.instruction
    header = tok.decode(e.input_ids[:e.num_prompt_tokens])
    assert header == "<|im_start|>user\n"  # what the chat template puts before the user's text


def test_lora_gradients_match_autograd_on_a_plain_peft_model(tiny):
    from accelerate import Accelerator
    from peft import LoraConfig, get_peft_model

    tok, _, task = tiny
    encoded = [encode_task_example(tok, task, task.instruction, x, 256) for x in task.train[:5]]
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                      task_type="CAUSAL_LM")  # random B too, so the gradients of A are not zero

    def fresh():
        torch.manual_seed(0)
        return get_peft_model(tiny_model(len(tok), seed=2), lora)

    ours = probe_prompts.lora_gradients(fresh(), encoded, Accelerator(cpu=True), batch_size=2)
    plain = fresh()
    total = sum(sum(1 for t in e.labels[1:] if t != IGNORE_INDEX) for e in encoded)
    loss = sum(plain(torch.tensor([e.input_ids]), labels=torch.tensor([e.labels])).loss *
               sum(1 for t in e.labels[1:] if t != IGNORE_INDEX) for e in encoded) / total
    loss.backward()
    for name, p in plain.named_parameters():
        if p.requires_grad:
            module, part = name.split(".lora_")
            size = p.numel()
            offset = 0 if part.startswith("A") else ours[module].numel() - size
            assert ours[module][offset:offset + size].tolist() == pytest.approx(
                p.grad.double().flatten().tolist(), rel=1e-3, abs=1e-7), name
    norm = math.sqrt(sum(float(p.grad.double().norm() ** 2) for p in plain.parameters() if p.requires_grad))
    assert math.sqrt(sum(float(g @ g) for g in ours.values())) == pytest.approx(norm, rel=1e-5)
    assert probe_prompts.cosine(ours[sorted(ours)[0]], ours[sorted(ours)[0]]) == pytest.approx(1.0)


# ----------------------------------------------------------------------------------------------------------------------
# The study end to end


def test_select_fixed_trains_with_the_named_candidate(model_dir, tmp_path, capsys):
    out = tmp_path / "fixed"
    common = ["--model", model_dir, "--sequence", "sentiment", "--max-candidates", "3", "--train-instances", "4",
              "--epochs", "1", "--global-batch-size", "4", "--micro-batch-size", "4", "--eval-instances", "2",
              "--max-new-tokens", "2", "--eval-batch-size", "2"]
    train_sapo.main([*common, "--select", "fixed:2", "--output-dir", str(out)])
    selection = json.loads((out / "1-sentiment" / "selection.json").read_text())
    pool = [c["instruction"] for c in selection["candidates"]]
    assert selection["method"] == "fixed:2" and selection["selected"] == 2 and selection["instruction"] == pool[2]
    assert pool[0] == load_task("sentiment", n_train=4).instruction and len(pool) == 3
    assert all(c["score"] is None for c in selection["candidates"])  # unscored: the pick is given
    assert len((out / "1-sentiment" / "train_log.jsonl").read_text().splitlines()) == 1
    with pytest.raises(SystemExit) as e:
        train_sapo.main([*common, "--select", "fixed:7", "--output-dir", str(tmp_path / "bad")])
    assert e.value.code == 2 and "--select fixed:7: task sentiment has 3 candidates" in capsys.readouterr().err


def test_study_end_to_end_then_resume_recomputes_nothing(model_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "probe"
    trained = []
    real_train = train_sapo.train_task

    def counting_train(accelerator, peft_model, name, previous, encoded, config, task_dir, *args, **kwargs):
        trained.append(Path(task_dir).name)
        return real_train(accelerator, peft_model, name, previous, encoded, config, task_dir, *args, **kwargs)

    monkeypatch.setattr(train_sapo, "train_task", counting_train)
    probe_prompts.main(["--model", model_dir, "--output-dir", str(out), *SMALL])
    assert "results: " in capsys.readouterr().out
    # T1 once, then T2 once per candidate, each from S1.
    assert trained == ["1-sentiment", "candidate-00", "candidate-01", "candidate-02"]
    pair_dir = out / "sentiment--topic"
    pool = json.loads((pair_dir / "indicators.json").read_text())["candidates"]
    for c in range(3):
        selection = json.loads((pair_dir / f"candidate-{c:02d}" / "selection.json").read_text())
        assert selection["method"] == f"fixed:{c}" and selection["instruction"] == pool[c]
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["indicators"]) == set(probe_prompts.Indicators.names()) and len(summary["indicators"]) >= 10
    assert all(s["definition"] and "sentiment->topic" in s["spearman"] for s in summary["indicators"].values())
    assert summary["pearson"]["sentiment->topic"]["tasks"] == ["sentiment", "animal"]
    assert len(summary["spearman"]["sentiment->topic"]["matrix"]) == 2
    assert [p["k"] for p in summary["pool_size"]] == [1, 2, 3]
    assert {"correlations.png", "indicators.png", "conflict.png", "pool_size.png", "scatter_sentiment--topic.png",
            "candidates.csv", "correlations.csv", "indicators.csv", "pool_size.csv", "conflict.csv"} <= \
        {p.name for p in out.iterdir()}
    conflict = json.loads((pair_dir / "conflict.json").read_text())
    losses = [i["pre_update_loss"] for i in json.loads((pair_dir / "indicators.json").read_text())["indicators"]]
    assert [x["candidate"] for x in conflict] == sorted(range(3), key=lambda c: losses[c])  # lowest loss first
    assert len(conflict[0]["modules"]) == 4 and all(-1 <= v <= 1 for v in conflict[0]["cosine_t1"])

    # The in-memory return to S1 leaves nothing behind: the last candidate's saved adapters, loaded afresh with stock
    # peft, give its recorded scores.
    from accelerate import Accelerator

    from tasks.models import load_model, load_tokenizer, stack_adapters

    config = json.loads((out / "config.json").read_text())
    state = stack_adapters(load_model(model_dir), [str(pair_dir / "1-sentiment" / "adapter"),
                                                   str(pair_dir / "candidate-02" / "adapter")]).get_base_model()
    recorded = json.loads((pair_dir / "candidate-02" / "scores.json").read_text())["scores"]
    for name, instruction in (("sentiment", None), ("topic", pool[2]), ("animal", None)):
        task = load_task(name, n_train=config["train_instances"])
        again = evaluate.evaluate_task(state, load_tokenizer(model_dir), task, instruction or task.instruction,
                                       Accelerator(cpu=True), max_instances=4, batch_size=4, max_new_tokens=4,
                                       max_prompt_tokens=256, progress=False)
        assert again["rougeL"] == pytest.approx(recorded[name]["rougeL"], abs=1e-9)

    # Rerun: every result is on disk; no model is loaded, trained, scored or run.
    before = (out / "summary.json").read_text()

    def forbidden(*args, **kwargs):
        raise AssertionError("recomputed on resume")

    for module, name in ((train_sapo, "train_task"), (probe_prompts, "load_model"), (evaluate, "generate_answers"),
                         (score_prompts, "score_candidates"), (probe_prompts, "token_statistics"),
                         (probe_prompts, "lora_gradients")):
        monkeypatch.setattr(module, name, forbidden)
    probe_prompts.main(["--model", model_dir, "--output-dir", str(out), *SMALL])
    assert (out / "summary.json").read_text() == before

    # Another setting is refused, and nothing is lost.
    with pytest.raises(SystemExit) as e:
        probe_prompts.main(["--model", model_dir, "--output-dir", str(out), *SMALL, "--gradient-instances", "3"])
    assert e.value.code == 2 and "gradient_instances differ" in capsys.readouterr().err
    assert (out / "summary.json").read_text() == before


def test_bad_pairs_fail_in_one_line(capsys):
    for bad in ("sentiment", "sentiment->sentiment", "->topic"):
        with pytest.raises(SystemExit) as e:
            probe_prompts.main(["--pairs", bad])
        assert e.value.code == 2 and "--pairs" in capsys.readouterr().err
