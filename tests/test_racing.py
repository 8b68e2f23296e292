"""Racing selection (score_prompts.race_candidates, --select sapo-race): with no confidence limit it is the exhaustive
argmin; it eliminates exactly the candidates whose paired-difference bound is above zero (recomputed here from the
returned instance sums); its token counts add up; train_sapo and the CLI write the rounds."""
import json
import math
import statistics

import pytest

import score_prompts as sp
from tasks import racing
import train_sapo
from tasks.loaders import load_task
from tiny import save_tiny_model_dir, tiny_model, tiny_tokenizer

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "model")


def setup_case(arch, seed, n_candidates, n_instances, task_name="sentiment"):
    tok = tiny_tokenizer()
    model = tiny_model(len(tok), arch=arch, seed=seed)
    task = load_task(task_name, n_train=n_instances)
    candidates = [task.instruction] + list(task.paraphrases[:n_candidates - 1])
    return model, tok, task, candidates, task.train[:n_instances]


def t_cdf_by_integration(z, dof, steps=4000):
    """P(T <= z) for Student's t by Simpson's rule on the density: independent of tasks.racing.student_t_cdf."""
    log_c = math.lgamma((dof + 1) / 2) - math.lgamma(dof / 2) - 0.5 * math.log(dof * math.pi)
    f = lambda t: math.exp(log_c - (dof + 1) / 2 * math.log1p(t * t / dof))  # noqa: E731
    h = z / steps
    s = f(0) + f(z) + sum((4 if k % 2 else 2) * f(k * h) for k in range(1, steps))
    return 0.5 + s * h / 3


@pytest.mark.parametrize("arch,seed,first,growth,confidence", [("llama", 0, 3, 2.0, None),
                                                                ("qwen3", 1, 2, 1.5, 1.0)])
def test_unlimited_confidence_equals_exhaustive(arch, seed, first, growth, confidence):
    model, tok, task, candidates, instances = setup_case(arch, seed, 6, 13)
    exhaustive = sp.score_candidates(model, tok, task, candidates, instances, progress=False)
    race = sp.race_candidates(model, tok, task, candidates, instances, first=first, growth=growth,
                              confidence=confidence, progress=False)
    assert race.selected == exhaustive.selected
    assert [r.num_instances for r in race.rounds] == racing.race_sizes(13, first, growth)
    assert len(race.rounds) > 2 and all(not r.eliminated and r.z is None for r in race.rounds)
    for r, e in zip(race.candidates, exhaustive.candidates):
        assert r.score == pytest.approx(e.score, rel=1e-6)
        assert r.instance_sums == pytest.approx(e.instance_sums, rel=1e-6)
        assert r.instance_counts == e.instance_counts
        assert r.num_instances_scored == 13 and r.eliminated_round is None
    assert race.tokens_scored == race.exhaustive_tokens == sum(c.num_tokens for c in exhaustive.candidates)


def test_eliminations_follow_the_bound_and_tokens_add_up():
    model, tok, task, candidates, instances = setup_case("llama", 3, 8, 40)
    confidence = 0.9
    race = sp.race_candidates(model, tok, task, candidates, instances, first=4, confidence=confidence,
                              progress=False)
    rounds, cands = race.rounds, race.candidates
    assert any(r.eliminated for r in rounds)  # the setup exercises elimination
    planned = racing.race_sizes(40, 4, 2.0)
    alive, previous = set(range(len(candidates))), 0
    for r in rounds:
        m = r.num_instances
        assert sorted(r.scored) == sorted(alive)
        # z: the one-sided t quantile at 1 - (1 - confidence) / rounds, with m - 1 degrees of freedom.
        assert t_cdf_by_integration(r.z, m - 1) == pytest.approx(1 - (1 - confidence) / len(planned), abs=1e-7)
        sums = {c: cands[c].instance_sums[:m] for c in r.scored}
        counts = {c: cands[c].instance_counts[:m] for c in r.scored}
        means = {c: math.fsum(sums[c]) / sum(counts[c]) for c in r.scored}
        assert r.leader == min(r.scored, key=lambda c: (means[c], c))
        per_instance = sum(counts[r.leader]) / m
        for c in r.scored:
            d = [(a - b) / per_instance for a, b in zip(sums[c], sums[r.leader])]
            lower = statistics.fmean(d) - r.z * statistics.stdev(d) / math.sqrt(m)
            if c in r.eliminated:
                assert lower > 0, (r.round, c, lower)
                assert cands[c].eliminated_round == r.round and cands[c].num_instances_scored == m
            else:
                assert lower <= 0, (r.round, c, lower)
        assert r.tokens_scored == sum(sum(cands[c].instance_counts[previous:m]) for c in r.scored)
        alive -= set(r.eliminated)
        assert sorted(r.survivors) == sorted(alive)
        previous = m
    assert race.selected in rounds[-1].survivors and race.selected == rounds[-1].leader
    assert all(cands[c].eliminated_round is None for c in alive)
    assert race.tokens_scored == sum(c.num_tokens for c in cands) == sum(r.tokens_scored for r in rounds)
    exhaustive = sp.score_candidates(model, tok, task, candidates, instances, progress=False)
    assert race.exhaustive_tokens == sum(c.num_tokens for c in exhaustive.candidates)
    assert race.tokens_scored < race.exhaustive_tokens


def test_race_rounds_on_known_sums():
    # Candidate 1 is 0.5 nats/token worse than candidate 0 on every instance, with a little noise; candidate 2 ties
    # candidate 0 exactly. One token per instance.
    noise = [0.01 * ((7 * i) % 5 - 2) for i in range(32)]
    table = {0: [1.0 + x for x in noise], 1: [1.5 + x + 0.01 * (i % 3) for i, x in enumerate(noise)],
             2: [1.0 + x for x in noise]}
    calls = []

    def score_slice(subset, lo, hi):
        calls.append((list(subset), lo, hi))
        return {c: (table[c][lo:hi], [1] * (hi - lo)) for c in subset}

    race = racing.race_rounds(score_slice, 3, 32, first=4, growth=2.0, confidence=0.95)
    assert calls == [([0, 1, 2], 0, 4), ([0, 2], 4, 8), ([0, 2], 8, 16), ([0, 2], 16, 32)]
    assert race.eliminated_round == {1: 1} and race.selected == 0  # a tie keeps the lower index
    calls.clear()
    never = racing.race_rounds(score_slice, 3, 32, first=4, growth=2.0, confidence=None)
    assert never.eliminated_round == {} and len(calls) == 4 and all(c[0] == [0, 1, 2] for c in calls)
    with pytest.raises(sp.SapoError):
        racing.race_sizes(32, 0, 2.0)
    with pytest.raises(sp.SapoError):
        racing.race_sizes(32, 4, 1.0)


def test_train_sapo_with_racing_writes_rounds(model_dir, tmp_path):
    out = tmp_path / "run"
    train_sapo.main(["--model", model_dir, "--output-dir", str(out), "--sequence", "sentiment",
                     "--score-instances", "8", "--max-candidates", "4", "--train-instances", "12", "--epochs", "2",
                     "--global-batch-size", "8", "--micro-batch-size", "4", "--eval-instances", "4",
                     "--max-new-tokens", "4", "--lr", "5e-3", "--eval-batch-size", "4",
                     "--select", "sapo-race", "--race-first", "2", "--race-confidence", "0.9",
                     "--reselect-every", "1", "--reselect-top", "2"])
    selection = json.loads((out / "1-sentiment" / "selection.json").read_text())
    assert selection["select"] == "sapo-race"
    assert [r["num_instances"] for r in selection["rounds"]][0] == 2
    assert selection["selected"] in selection["rounds"][-1]["survivors"]
    assert selection["instruction"] == selection["candidates"][selection["selected"]]["instruction"]
    assert selection["tokens_scored"] == sum(r["tokens_scored"] for r in selection["rounds"])
    assert all("num_instances_scored" in c and "eliminated_round" in c for c in selection["candidates"])
    assert len(selection["reselections"]) > 0 and all(len(e["scores"]) == 2 for e in selection["reselections"])
    config = json.loads((out / "config.json").read_text())
    assert config["race_first"] == 2 and config["race_confidence"] == 0.9


def test_cli_select_sapo_race(model_dir, tmp_path, capsys):
    out = tmp_path / "race.json"
    sp.main(["--model", model_dir, "--task", "sentiment", "--instances", "6", "--select", "sapo-race",
             "--race-first", "2", "--output", str(out), "--no-progress", "--no-cache"])
    result = json.loads(out.read_text())
    assert result["method"] == "sapo-race" and result["rounds"][0]["num_instances"] == 2
    assert result["selected"] == result["rounds"][-1]["leader"]
    assert "response tokens" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        sp.main(["--model", model_dir, "--task", "sentiment", "--select", "sapo-race", "--race-confidence", "0"])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        train_sapo.main(["--model", model_dir, "--select", "sapo-race", "--race-first", "0"])
    assert e.value.code == 2
