"""probe_prompts.py and tasks/statistics.py: every indicator against a direct computation (under S1 and under the base
model), the base-weight gradients against autograd, the statistics (variance decomposition, Fisher-z pooling, paired
bootstrap, Student-t) against numpy and hand computations, the pool-size curve on a hand-made table, one tiny
multi-seed study end to end (equal instance sets, n recorded), its resume (nothing recomputed) and refusal of changed
settings; train_sapo's --select fixed:K and --pool-sample."""
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
from tasks.statistics import (average_ranks, bootstrap_interval, bootstrap_samples, fisher_z_pool,
                              flesch_kincaid_grade, pearson, relative_change, spearman, student_t_quantile, syllables,
                              t_interval, variance_decomposition)
from tiny import save_tiny_model_dir, tiny_model, tiny_tokenizer

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")

SMALL = ["--pairs", "sentiment->topic", "--unseen", "animal", "--max-candidates", "3", "--score-instances", "4",
         "--train-instances", "8", "--epochs", "1", "--global-batch-size", "4", "--micro-batch-size", "4",
         "--eval-instances", "4", "--max-new-tokens", "4", "--seeds", "2", "--permutations", "50",
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


def test_variance_decomposition_by_hand():
    table = [[1.0, 2.0], [3.0, 5.0], [2.0, 2.5]]  # 3 candidates x 2 seeds
    # Candidate means 1.5, 4, 2.25, grand mean 31/12. MS_candidates = 2 * sum (mean_c - grand)^2 / 2;
    # MS_seeds = (0.25 + 0.25 + 1 + 1 + 0.0625 + 0.0625) / (3 * 1) = 0.875.
    grand = 31 / 12
    ms_c = 2 * ((1.5 - grand) ** 2 + (4 - grand) ** 2 + (2.25 - grand) ** 2) / 2
    v = variance_decomposition(table, permutations=200, seed=0)
    assert v.ms_candidates == pytest.approx(ms_c) and v.ms_seeds == pytest.approx(0.875)
    assert v.seed_variance == pytest.approx(0.875) and v.candidate_variance == pytest.approx((ms_c - 0.875) / 2)
    assert v.f == pytest.approx(ms_c / 0.875) and v.candidate_sd == pytest.approx(math.sqrt((ms_c - 0.875) / 2))
    # The permutation p-value by a direct loop over the same generator.
    rng, flat, hits = np.random.default_rng(0), np.asarray(table).ravel(), 0
    for _ in range(200):
        y = rng.permutation(flat).reshape(3, 2)
        m = y.mean(1)
        hits += (2 * ((m - y.mean()) ** 2).sum() / 2) / (((y - m[:, None]) ** 2).sum() / 3) >= v.f
    assert v.p_value == pytest.approx((1 + hits) / 201)
    # Seeds that vary more than candidates: no candidate variance (clipped at 0), F < 1, p large.
    noisy = variance_decomposition([[0.0, 10.0], [1.0, 9.0], [0.5, 9.5]], permutations=100)
    assert noisy.candidate_variance == 0.0 and noisy.f < 1 and noisy.p_value > 0.5
    # Candidates far apart, seeds close: p at its floor 1 / (1 + permutations) up to rare ties.
    clear = variance_decomposition([[0.0, 0.1, 0.2], [5.0, 5.1, 5.2], [10.0, 10.1, 10.2], [15.0, 15.1, 15.2]],
                                   permutations=100)
    assert clear.p_value <= 2 / 101 and clear.seed_variance == pytest.approx(0.01)
    # One seed: no noise floor; the candidate variance is the plain variance (ddof 1).
    one = variance_decomposition([[1.0], [2.0], [4.0]])
    assert math.isnan(one.seed_variance) and math.isnan(one.p_value)
    assert one.candidate_variance == pytest.approx(np.var([1, 2, 4], ddof=1))


def test_fisher_z_pooling_and_student_t_by_hand():
    # Weights n - 3: 5 and 2; a NaN correlation is left out.
    assert fisher_z_pool([0.5, -0.2, float("nan")], [8, 5, 8]) == pytest.approx(
        math.tanh((5 * math.atanh(0.5) + 2 * math.atanh(-0.2)) / 7))
    assert fisher_z_pool([0.3, 0.3], [8, 20]) == pytest.approx(0.3)
    assert fisher_z_pool([1.0], [8]) == pytest.approx(0.9999)  # clipped: atanh(1) is infinite
    assert fisher_z_pool([0.4, 0.6], [3, 2]) == pytest.approx(math.tanh((math.atanh(0.4) + math.atanh(0.6)) / 2))
    assert math.isnan(fisher_z_pool([float("nan")], [8]))
    # Student-t quantiles from the tables.
    for p, df, t in [(0.975, 1, 12.7062047), (0.975, 2, 4.3026527), (0.975, 9, 2.2621572), (0.95, 4, 2.1318468),
                     (0.025, 4, -2.7764451), (0.5, 3, 0.0)]:
        assert student_t_quantile(p, df) == pytest.approx(t, abs=1e-6)
    low, high = t_interval([1.0, 2.0, 3.0], 0.95)  # mean 2, sd 1, n 3
    assert (low, high) == pytest.approx((2 - 4.3026527 / math.sqrt(3), 2 + 4.3026527 / math.sqrt(3)))
    assert all(math.isnan(x) for x in t_interval([1.0]))
    # bootstrap_samples: bootstrap_interval's draws, one row per resample.
    rows = bootstrap_samples(lambda idx: [idx[0].sum(), 10 * idx[1].sum()], [4, 6], resamples=20, seed=3)
    rng = np.random.default_rng(3)
    for row in rows:
        a, b = rng.integers(0, 4, size=4), rng.integers(0, 6, size=6)
        assert row.tolist() == [a.sum(), 10 * b.sum()]


def hand_made_pairs(n=10, seeds=2):
    """Two pairs whose pre-update loss orders the candidates exactly as their cross-task scores (by construction),
    with a second indicator that is noise, a static (base-model) loss that is noise, a copy of the loss, and an
    in-task score that varies with the seed only."""
    rng = np.random.default_rng(0)
    pairs = []
    for label in ("t2", "t3"):
        quality = rng.permutation(n).astype(float)
        seed_scores = [[{"t1": 40 + 3 * q + 0.1 * s, "u": 20 + 2 * q - 0.1 * s, label: 50 + (1.0 if s else -1.0)}
                        for s in range(seeds)] for q in quality]
        scores = [{t: float(np.mean([r[t] for r in runs])) for t in runs[0]} for runs in seed_scores]
        noise = rng.normal(size=n)
        adaptive = [probe_prompts.Indicators(pre_update_loss=-q, first_token_loss=-q, length_tokens=float(x))
                    for q, x in zip(quality, noise)]
        static = [probe_prompts.Indicators(pre_update_loss=float(x), first_token_loss=-q)
                  for q, x in zip(quality, rng.normal(size=n))]
        pairs.append(probe_prompts.PairResult("t1", label, ["u"], [f"p{c}" for c in range(n)], adaptive, scores, [],
                                              static=static, seed_scores=seed_scores,
                                              instances={"pre_update_loss": 16}))
    return pairs


def test_paired_bootstrap_and_pooling_where_the_loss_dominates_by_construction():
    pairs = hand_made_pairs()
    analysis = probe_prompts.analyse(pairs, probe_prompts.ProbeConfig(bootstrap=200, permutations=100))
    loss = analysis.indicators["pre_update_loss"]
    assert loss.spearman == {"t1->t2": pytest.approx(1.0), "t1->t3": pytest.approx(1.0)}
    assert loss.pooled == pytest.approx(0.9999) and loss.instances == {"t1->t2": 16, "t1->t3": 16}
    # The noise indicator: its pooled r is the Fisher-z pool of the pairs' r (equal weights n - 3 = 7).
    noise = analysis.indicators["length_tokens"]
    r = [probe_prompts.indicator_correlation(p, "length_tokens", spearman) for p in pairs]
    assert noise.pooled == pytest.approx(math.tanh((math.atanh(r[0]) + math.atanh(r[1])) / 2))
    assert noise.mean == pytest.approx(np.mean(r)) and noise.low <= noise.pooled <= noise.high
    # Paired bootstrap of the difference: the loss beats the noise with an interval above 0; an exact copy of the
    # loss differs by 0 on every draw.
    beats = analysis.versus_loss["length_tokens"]
    assert beats.estimate == pytest.approx(0.9999 - noise.pooled) and beats.low > 0 and beats.verdict() == "> 0"
    same = analysis.versus_loss["first_token_loss"]
    assert (same.estimate, same.low, same.high) == pytest.approx((0.0, 0.0, 0.0))
    # Static vs adaptive: the static loss is noise, so the adaptive one is better, with an interval above 0; the
    # static first-token loss equals the adaptive one (difference exactly 0).
    assert analysis.static["pre_update_loss"].variant == "static" and analysis.indicators["pre_update_loss"].variant \
        == "adaptive"
    assert analysis.adaptive_minus_static["pre_update_loss"].low > 0
    assert analysis.adaptive_minus_static["first_token_loss"].estimate == pytest.approx(0.0)
    assert set(analysis.static) == set(probe_prompts.Indicators.model_names())
    # Noise floor: in-task (t2/t3) varies with the seed only, the cross tasks with the candidate.
    for p in pairs:
        rows = {t.task: t for t in analysis.noise[p.label]}
        in_task = rows[p.t2]
        table = p.relative_table(p.t2)
        assert in_task.role == "in-task" and in_task.candidate_sd == pytest.approx(0.0) and \
            in_task.seed_sd == pytest.approx(variance_decomposition(table).seed_sd)
        assert rows["t1"].p_value <= 2 / 101 and rows["t1"].role == "forgetting (T1)" and rows["u"].role == "unseen"
        # The spread difference: the mean of the cross tasks' candidate sd minus the in-task one.
        expected = np.mean([variance_decomposition(p.relative_table(t)).candidate_sd for t in ("t1", "u")])
        assert analysis.spread[p.label].estimate == pytest.approx(expected)
    pooled = analysis.spread["pooled"]
    assert pooled.estimate == pytest.approx(np.mean([analysis.spread[p.label].estimate for p in pairs]))
    assert pooled.low > 0  # cross-task spread above in-task spread, with an interval
    # Cross-task correlation pooled over pairs: t1 and u both increase with the quality, so r = 1 in every pair.
    assert analysis.cross_correlation["spearman"].estimate == pytest.approx(0.9999)


def test_correlation_matrix_against_numpy():
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


def lora_model(tok):
    """The tiny model with a random LoRA on q_proj and v_proj (B != 0: the adapter changes the function)."""
    from peft import LoraConfig, get_peft_model

    model = tiny_model(len(tok), seed=2)
    torch.manual_seed(0)
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
                                            init_lora_weights=False, task_type="CAUSAL_LM"))


def autograd_weight_gradients(plain, encoded) -> dict[str, torch.Tensor]:
    """Autograd on a plain transformers model: the gradient of the token-weighted mean response NLL w.r.t. every
    q_proj / v_proj weight, one unpadded sequence at a time."""
    for p in plain.parameters():
        p.requires_grad_(False)
        p.grad = None
    weights = {n: m.weight for n, m in plain.named_modules() if n.endswith(("q_proj", "v_proj"))}
    for w in weights.values():
        w.requires_grad_(True)
    counts = [sum(1 for t in e.labels[1:] if t != IGNORE_INDEX) for e in encoded]
    loss = sum(plain(torch.tensor([e.input_ids]), labels=torch.tensor([e.labels])).loss * n
               for e, n in zip(encoded, counts)) / sum(counts)
    loss.backward()
    return {n: w.grad.double() for n, w in weights.items()}


def test_base_weight_gradients_match_autograd_on_a_plain_model(tiny):
    from accelerate import Accelerator

    tok, _, task = tiny
    encoded = [encode_task_example(tok, task, task.instruction, x, 256) for x in task.train[:5]]
    other = [encode_task_example(tok, task, task.paraphrases[0], x, 256) for x in task.train[:3]]
    model = lora_model(tok)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    accelerator = Accelerator(cpu=True)
    net = model.get_base_model()  # the transformers model with the LoRA layers inside (what ModelState.model is)
    reference = probe_prompts.weight_gradients(net, other, accelerator, ["q_proj", "v_proj"], batch_size=2,
                                               keep=True)
    ours = probe_prompts.weight_gradients(net, encoded, accelerator, ["q_proj", "v_proj"], batch_size=2,
                                          references={"other": reference.full}, keep=True)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags  # put back
    assert all(p.grad is None for p in model.parameters())
    # With the LoRA active the function is W + s B A: the gradient w.r.t. W is that of the merged plain model's
    # weight (d/dW = d/dW_eff).
    expected = autograd_weight_gradients(lora_model(tok).merge_and_unload(), encoded)
    expected_other = autograd_weight_gradients(lora_model(tok).merge_and_unload(), other)
    assert sorted(ours.norm2) == sorted(expected) and len(expected) == 4  # 2 layers x (q_proj, v_proj)
    for name, g in expected.items():
        assert float(g.norm()) > 0, name  # the whole gradient is informative, not half of it zero
        # float32 forwards of W + s B A and of the merged weight round differently: compared to the gradient's scale
        assert float((ours.full[name].double() - g).abs().max()) <= 1e-4 * float(g.abs().max()), name
        assert ours.norm2[name] == pytest.approx(float(g.square().sum()), rel=1e-4)
        assert ours.dots["other"][name] == pytest.approx(float((g * expected_other[name]).sum()), rel=1e-4)
        cos = float((g * expected_other[name]).sum() / (g.norm() * expected_other[name].norm()))
        assert ours.cosines("other", reference.norm2)[name] == pytest.approx(cos, rel=1e-4, abs=1e-6)
    assert ours.norm == pytest.approx(math.sqrt(sum(float(g.square().sum()) for g in expected.values())), rel=1e-4)
    # Why not a fresh LoRA's gradient: with B = 0 the A half is exactly 0 (peft's default init).
    from peft import LoraConfig, get_peft_model

    fresh = get_peft_model(tiny_model(len(tok), seed=2), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                                    target_modules=["q_proj", "v_proj"],
                                                                    task_type="CAUSAL_LM"))
    counts = [sum(1 for t in e.labels[1:] if t != IGNORE_INDEX) for e in encoded]
    sum(fresh(torch.tensor([e.input_ids]), labels=torch.tensor([e.labels])).loss * n
        for e, n in zip(encoded, counts)).backward()
    assert all(float(p.grad.abs().max()) == 0 for n, p in fresh.named_parameters() if "lora_A" in n)


def test_indicators_under_s1_and_under_the_base_model_against_direct_computation(tiny, model_dir, tmp_path):
    from accelerate import Accelerator

    tok, _, task = tiny
    model = lora_model(tok)  # "S1": the base with an adapter that changes its outputs
    state = train_sapo.ModelState(model=model.get_base_model(), peft_model=model)
    config = probe_prompts.ProbeConfig(score_instances=4, micro_batch_size=2, max_source_length=256,
                                       max_target_length=16, eval_batch_size=4, max_new_tokens=4)
    accelerator = Accelerator(cpu=True)
    run = train_sapo.Run(config, accelerator, [task], tmp_path, tok, model_dir, [])
    pool = [task.instruction, task.paraphrases[0]]
    adaptive = probe_prompts.model_indicators(run, state, task, pool, tmp_path, static=False)
    static = probe_prompts.model_indicators(run, state, task, pool, tmp_path, static=True)
    again = probe_prompts.model_indicators(run, state, task, pool, tmp_path / "again", static=False)
    assert again == adaptive  # the adapters are active again after the static pass
    instances = task.train[:4]
    for plain, got in ((lora_model(tok).merge_and_unload(), adaptive), (tiny_model(len(tok), seed=2), static)):
        for c, p in enumerate(pool):
            encoded = [encode_task_example(tok, task, p, x, 272) for x in instances]
            direct = score_prompts.reference_score(plain, tok, task, p, instances, 272)
            assert got[c].pre_update_loss == pytest.approx(direct.score, rel=1e-4)
            first = [-torch.log_softmax(plain(torch.tensor([e.input_ids])).logits[0].double(), -1)[
                e.num_prompt_tokens - 1, e.labels[e.num_prompt_tokens]].item() for e in encoded]
            assert got[c].first_token_loss == pytest.approx(np.mean(first), rel=1e-4)
            zero_shot = evaluate.evaluate_task(plain, tok, task, p, accelerator, split="train", max_instances=4,
                                               batch_size=4, max_new_tokens=4, max_prompt_tokens=256, progress=False)
            assert got[c].zero_shot_rouge == pytest.approx(zero_shot.rougeL)
            norm = math.sqrt(sum(float(g.square().sum()) for g in autograd_weight_gradients(plain, encoded).values()))
            assert got[c].gradient_norm == pytest.approx(norm, rel=1e-4)
    assert adaptive[0].pre_update_loss != pytest.approx(static[0].pre_update_loss, rel=1e-3)  # S1 is not the base
    assert adaptive[1].rouge_to_original == static[1].rouge_to_original  # text indicators: one value


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


def test_pool_sample_draws_k_candidates_with_the_original(model_dir, tmp_path, capsys):
    from tasks.candidates import candidate_pool
    from tasks.pools import PoolSource, limit_pool

    pool = [f"p{i}" for i in range(10)]
    assert limit_pool(pool, 4, None, "t") == pool[:4]  # without a seed: the first k, as before
    drawn = limit_pool(pool, 4, 7, "t")
    import random

    expected = sorted(random.Random("7:t").sample(range(1, 10), 3))  # the definition, spelled out
    assert drawn == ["p0"] + [pool[i] for i in expected] and len(set(drawn)) == 4
    assert limit_pool(pool, 4, 7, "t") == drawn  # a rerun draws the same
    assert {tuple(limit_pool(pool, 4, seed, "t")) for seed in range(20)} != {tuple(drawn)}  # other seeds, others
    assert all(limit_pool(pool, 4, seed, "t")[0] == "p0" for seed in range(20))
    assert limit_pool(pool, 12, 3, "t") == pool
    # Through train_sapo: --max-candidates 3 --pool-sample 5 scores exactly those 3.
    out = tmp_path / "sampled"
    train_sapo.main(["--model", model_dir, "--sequence", "sentiment", "--max-candidates", "3", "--pool-sample", "5",
                     "--train-instances", "4", "--score-instances", "2", "--epochs", "1", "--global-batch-size", "4",
                     "--micro-batch-size", "4", "--eval-instances", "2", "--max-new-tokens", "2",
                     "--eval-batch-size", "2", "--output-dir", str(out)])
    selection = json.loads((out / "1-sentiment" / "selection.json").read_text())
    full = candidate_pool(load_task("sentiment", n_train=4))
    assert [c["instruction"] for c in selection["candidates"]] == limit_pool(full, 3, 5, "sentiment")
    assert PoolSource(max_candidates=3, pool_sample=5).build(load_task("sentiment", n_train=4)) == \
        limit_pool(full, 3, 5, "sentiment")
    with pytest.raises(SystemExit) as e:
        train_sapo.main(["--model", model_dir, "--pool-sample", "5", "--output-dir", str(tmp_path / "bad")])
    assert e.value.code == 2 and "--pool-sample SEED draws --max-candidates K" in capsys.readouterr().err


def test_study_end_to_end_then_resume_recomputes_nothing(model_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "probe"
    trained = []
    real_train = train_sapo.train_task

    def counting_train(accelerator, peft_model, name, previous, encoded, config, task_dir, *args, **kwargs):
        trained.append(Path(task_dir).name)
        return real_train(accelerator, peft_model, name, previous, encoded, config, task_dir, *args, **kwargs)

    # Equal samples: every model indicator reads the same first score_instances (4) training instances of T2.
    sizes = {"token_statistics": [], "weight_gradients": [], "zero_shot": [], "scored": []}
    real = {name: getattr(probe_prompts, name) for name in ("token_statistics", "weight_gradients")}
    real_evaluate, real_score = evaluate.evaluate_task, score_prompts.score_candidates

    def spy(name):
        def wrapped(model, encoded, *args, **kwargs):
            sizes[name].append(len(encoded))
            return real[name](model, encoded, *args, **kwargs)
        return wrapped

    def spy_evaluate(model, tokenizer, task, instruction, accelerator, **kwargs):
        if kwargs.get("split") == "train":  # the zero-shot indicators (evaluations run on the test split)
            sizes["zero_shot"].append((task.name, kwargs["max_instances"]))
        return real_evaluate(model, tokenizer, task, instruction, accelerator, **kwargs)

    def spy_score(model, tokenizer, task, candidates, instances, *args, **kwargs):
        sizes["scored"].append(len(instances))
        return real_score(model, tokenizer, task, candidates, instances, *args, **kwargs)

    monkeypatch.setattr(probe_prompts, "token_statistics", spy("token_statistics"))
    monkeypatch.setattr(probe_prompts, "weight_gradients", spy("weight_gradients"))
    monkeypatch.setattr(evaluate, "evaluate_task", spy_evaluate)
    monkeypatch.setattr(score_prompts, "score_candidates", spy_score)
    monkeypatch.setattr(train_sapo, "train_task", counting_train)
    probe_prompts.main(["--model", model_dir, "--output-dir", str(out), *SMALL])
    printed = capsys.readouterr().out
    assert "results: " in printed
    lines = [line for line in printed.splitlines() if line.strip()]
    assert lines[0].startswith("study: 1 pair(s) x 3 candidates x 2 seed(s) = 6 T2 trainings (+1 T1), 2 optimizer "
                               "steps each; ")  # the first line: the study's size
    # 6 arms x 3 evaluated tasks x 4 test instances + 2 (static, S1) x 3 candidates x 4 zero-shot answers
    assert "; 96 generated answers; 24 scored sequences;" in lines[0]
    assert any(line.startswith("first arm: ") and "for the 5 arms left" in line for line in lines)
    assert "noise floor over 3 candidates x 2 seeds" in printed
    # T1 once, then T2 once per candidate and seed, each from S1.
    assert trained == ["1-sentiment"] + [f"candidate-{c:02d}-seed-{s}" for c in range(3) for s in range(2)]
    # Per candidate and variant (S1, base): 4 scored, 4 for the per-token statistics (+ 1 instruction sequence),
    # 4 zero-shot answers, 4 in the gradient; the T1 and unseen reference gradients on 4 too.
    assert sizes["scored"] == [4, 4] and sorted(set(sizes["token_statistics"])) == [1, 4]
    assert sizes["token_statistics"].count(4) == 6 and set(sizes["weight_gradients"]) == {4}
    assert sizes["zero_shot"] == [("topic", 4)] * 6
    pair_dir = out / "sentiment--topic"
    stored = json.loads((pair_dir / "indicators.json").read_text())
    pool = stored["candidates"]
    assert stored["instances"] == {**{n: 4 for n in probe_prompts.Indicators.model_names()}, "instruction_loss": 0,
                                   "length_tokens": 0, "readability_grade": 0, "rouge_to_original": 0}
    assert len(stored["static"]) == 3 and stored["static"][0]["pre_update_loss"] != stored["indicators"][0][
        "pre_update_loss"]  # the base model scores otherwise than S1
    trained_b = {}
    for c in range(3):
        for s in range(2):
            arm = pair_dir / f"candidate-{c:02d}-seed-{s}"
            selection = json.loads((arm / "selection.json").read_text())
            assert selection["method"] == f"fixed:{c}" and selection["instruction"] == pool[c]
            from safetensors.torch import load_file

            trained_b[c, s] = load_file(str(arm / "adapter" / "adapter_model.safetensors"))
    # Another seed is another LoRA initialisation and data order: different weights for the same candidate.
    key = sorted(trained_b[0, 0])[0]
    assert not torch.equal(trained_b[0, 0][key], trained_b[0, 1][key])
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["indicators"]) == set(probe_prompts.Indicators.names()) and len(summary["indicators"]) >= 10
    assert all(s["definition"] and "sentiment->topic" in s["spearman"] for s in summary["indicators"].values())
    assert summary["indicators"]["zero_shot_rouge"]["instances"] == {"sentiment->topic": 4}
    assert summary["indicators"]["gradient_norm"]["instances"] == {"sentiment->topic": 4}
    assert set(summary["static_indicators"]) == set(probe_prompts.Indicators.model_names())
    assert set(summary["adaptive_minus_static"]) == set(probe_prompts.Indicators.model_names())
    noise = summary["noise_floor"]["sentiment->topic"]
    assert [t["task"] for t in noise] == ["topic", "sentiment", "animal"] and all(t["seeds"] == 2 for t in noise)
    assert {"pooled", "sentiment->topic"} == set(summary["cross_minus_in_task_spread"])
    assert len(summary["pairs"][0]["seed_scores"]) == 3 and len(summary["pairs"][0]["seed_scores"][0]) == 2
    assert summary["pearson"]["sentiment->topic"]["tasks"] == ["sentiment", "animal"]
    assert len(summary["spearman"]["sentiment->topic"]["matrix"]) == 2
    assert [p["k"] for p in summary["pool_size"]] == [1, 2, 3]
    assert {"correlations.png", "indicators.png", "conflict.png", "pool_size.png", "scatter_sentiment--topic.png",
            "candidates.csv", "correlations.csv", "indicators.csv", "pool_size.csv", "conflict.csv", "noise_floor.csv",
            "noise_floor.png"} <= \
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
                                                   str(pair_dir / "candidate-02-seed-1" / "adapter")]).get_base_model()
    recorded = json.loads((pair_dir / "candidate-02-seed-1" / "scores.json").read_text())["scores"]
    for name, instruction in (("sentiment", None), ("topic", pool[2]), ("animal", None)):
        task = load_task(name, n_train=config["train_instances"])
        again = real_evaluate(state, load_tokenizer(model_dir), task, instruction or task.instruction,
                                       Accelerator(cpu=True), max_instances=4, batch_size=4, max_new_tokens=4,
                                       max_prompt_tokens=256, progress=False)
        assert again.rougeL == pytest.approx(recorded[name]["rougeL"], abs=1e-9)

    # Rerun: every result is on disk; no model is loaded, trained, scored or run.
    before = (out / "summary.json").read_text()

    def forbidden(*args, **kwargs):
        raise AssertionError("recomputed on resume")

    for module, name in ((train_sapo, "train_task"), (probe_prompts, "load_model"), (evaluate, "generate_answers"),
                         (score_prompts, "score_candidates"), (probe_prompts, "token_statistics"),
                         (probe_prompts, "weight_gradients"), (probe_prompts, "model_indicators")):
        monkeypatch.setattr(module, name, forbidden)
    probe_prompts.main(["--model", model_dir, "--output-dir", str(out), *SMALL])
    assert (out / "summary.json").read_text() == before

    # Another setting is refused, and nothing is lost.
    with pytest.raises(SystemExit) as e:
        probe_prompts.main(["--model", model_dir, "--output-dir", str(out), *SMALL, "--seeds", "3"])
    assert e.value.code == 2 and "seeds differ" in capsys.readouterr().err
    assert (out / "summary.json").read_text() == before


def test_bad_pairs_fail_in_one_line(capsys):
    for bad in ("sentiment", "sentiment->sentiment", "->topic"):
        with pytest.raises(SystemExit) as e:
            probe_prompts.main(["--pairs", bad])
        assert e.value.code == 2 and "--pairs" in capsys.readouterr().err
