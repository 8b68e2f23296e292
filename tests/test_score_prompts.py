"""score_prompts.py: scores equal the plain HF loss; ties keep the original; 1 and 2 processes agree bitwise; an
interrupted run resumes without recomputing; paraphrases are parsed and validated; bad CLI input is one line, exit 2."""
import dataclasses
import http.server
import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

import score_prompts as sp
from tasks import packing, paraphrases
from tasks.score_cache import model_state_id
from tasks import SapoError
from tasks.core import Instance, Task
from tiny import save_tiny_model_dir, tiny_model, tiny_tokenizer

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# One thread: the tiny models gain nothing from more, and OpenMP threads that spin-wait for each other slow down by
# orders of magnitude when other jobs share the cores.
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT),
       "OMP_NUM_THREADS": "1"}


INSTRUCTION = "Classify the sentiment of the review as positive or negative."
CANDIDATES = [INSTRUCTION,
              "Is the review positive or negative? Classify the sentiment.",
              "Read the text and answer positive or negative for its sentiment.",
              "Sentiment of the review: answer with positive or negative."]


def make_task(n=7) -> Task:
    # Inputs of different lengths; answers of one to several tokens (multi-token labels are scored token by token).
    answers = ["positive", "negative", "positive and negative", "negative, then positive", "positive"]
    train = [Instance("the movie was great " * (1 + i % 4) + "and {braces} stay" * (i % 2), answers[i % 5])
             for i in range(n)]
    return Task("tiny_sentiment", INSTRUCTION, "Answer positive or negative.", ("positive", "negative"),
                train=train, dev=train[:2], test=train[:2])


def plain_losses(model, tok, task, candidate, instances):
    """The original method, one instance at a time: HF's own shifted cross-entropy over the response tokens
    (score_prompts.reference_score, the oracle the scorer is checked against)."""
    reference = sp.reference_score(model, tok, task, candidate, instances)
    return reference.instance_losses, reference.instance_counts


def sliding_qwen3(vocab):
    from transformers import AutoModelForCausalLM, Qwen3Config

    # Alternating full/sliding layers with a window shorter than the sequences: the per-layer-type masks matter.
    config = Qwen3Config(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, use_sliding_window=True,
                         sliding_window=9, max_window_layers=1)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(8.0)
    return model.eval()


@pytest.mark.parametrize("arch,attn", [("llama", "sdpa"), ("qwen3", "sdpa"), ("llama", "eager"),
                                       ("qwen3", "padded"), ("qwen3-sliding", "sdpa")])
def test_scores_equal_plain_hf_loss(arch, attn, monkeypatch):
    tok = tiny_tokenizer()
    model = sliding_qwen3(len(tok)) if arch == "qwen3-sliding" else tiny_model(len(tok), arch=arch)
    task = make_task()
    if attn == "padded":  # the fallback for attention kinds that cannot take the packed mask
        setup = packing.scoring_setup
        monkeypatch.setattr(packing, "scoring_setup", lambda m: dataclasses.replace(setup(m), packed=False))
    else:
        model.config._attn_implementation = attn
    plans = []
    plan = packing.plan_batches
    monkeypatch.setattr(packing, "plan_batches", lambda *a, **k: plans.append(plan(*a, **k)) or plans[-1])
    # A tiny budget and narrow rows: several batches per candidate and several sequences per row.
    result = sp.score_candidates(model, tok, task, CANDIDATES, task.train, token_budget=260, row_tokens=120,
                                 progress=False)
    batches = plans[0]
    assert len(batches) >= 2 * len(CANDIDATES)
    if attn != "padded":
        assert max(len(row.seqs) for rows in batches for row in rows) >= 2
        assert max(len(rows) for rows in batches) >= 2
    assert result.packing == ("padded" if attn == "padded" else "shared-prefix")
    for c, r in enumerate(result.candidates):
        losses, counts = plain_losses(model, tok, task, CANDIDATES[c], task.train)
        assert r.index == c and r.instruction == CANDIDATES[c] and not r.cached
        assert r.num_tokens == sum(counts)
        assert r.instance_losses == pytest.approx(losses, rel=1e-5)
        assert r.score == pytest.approx(sum(l * n for l, n in zip(losses, counts)) / sum(counts), rel=1e-5)
        assert r.instance_mean == pytest.approx(sum(losses) / len(losses), rel=1e-5)
    scores = [r.score for r in result.candidates]
    assert result.selected == scores.index(min(scores))
    assert len(set(round(s, 6) for s in scores)) == len(scores)  # the prompt changes the loss


def test_select_index_ties_keep_the_original():
    assert sp.select_index([1.5, 1.5, 2.0]) == 0
    assert sp.select_index([2.0, 1.0, 1.0]) == 1
    assert sp.select_index([3.0, 2.0, 1.0]) == 2
    # A non-finite score is an error, never a pick (before: NaN was skipped and the rest picked from).
    for scores, bad in (([float("nan"), 1.0], "candidate 0 scored nan"), ([1.0, float("inf")], "candidate 1 scored inf")):
        with pytest.raises(SapoError, match=f"task t: {bad}, not a finite loss"):
            sp.select_index(scores, "t")


def write_sapo_data(root: Path, n=8) -> Path:
    task = make_task(n)
    (root / "tiny_sentiment").mkdir(parents=True)
    for split in ("train", "dev", "test"):
        records = [{"sentence": x.input, "label": x.label} for x in getattr(task, split)]
        (root / "tiny_sentiment" / f"{split}.json").write_text(json.dumps(records))
    (root / "instructions.json").write_text(json.dumps(
        {"tiny_sentiment": {"instruction": task.instruction, "suffix": task.suffix, "labels": list(task.label_words)}}))
    return root


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_one_and_two_processes_give_identical_scores(tmp_path):
    model_dir = save_tiny_model_dir(tmp_path / "model", arch="qwen3")
    data = write_sapo_data(tmp_path / "data")
    cands = tmp_path / "cands.json"
    cands.write_text(json.dumps({"tiny_sentiment": CANDIDATES[1:]}))
    args = ["score_prompts.py", "--model", model_dir, "--data-dir", str(data), "--task", "tiny_sentiment",
            "--candidates", str(cands), "--instances", "7", "--token-budget", "260", "--row-tokens", "120",
            "--no-progress", "--no-cache"]
    env = {**ENV, "ACCELERATE_USE_CPU": "1"}  # ENV pins 1 thread per process: the same kernels in both runs
    one = subprocess.run([sys.executable, *args, "--output", str(tmp_path / "one.json")], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
                          "--main_process_port", str(free_port()), *args, "--output", str(tmp_path / "two.json")],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert two.returncode == 0, two.stderr
    a, b = (json.loads((tmp_path / f).read_text()) for f in ("one.json", "two.json"))
    assert a["num_processes"] == 1 and b["num_processes"] == 2 and a["num_batches"] >= 4
    assert a["selected"] == b["selected"]
    strip = lambda r: {k: v for k, v in r.items() if k != "seconds"}  # noqa: E731
    assert [strip(r) for r in a["candidates"]] == [strip(r) for r in b["candidates"]]  # bitwise: exact floats
    assert [r["instruction"] for r in a["candidates"]] == CANDIDATES
    assert "selected" in one.stdout and "original" in one.stdout  # the table, printed once (main process)
    assert two.stdout.count("* selected") == 1


class CountingForward:
    """Wraps the backbone's forward: counts calls, optionally interrupts the run at call `stop_at`."""

    def __init__(self, module, stop_at=None):
        self.calls, self.stop_at, self.forward = 0, stop_at, module.forward

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.stop_at is not None and self.calls == self.stop_at:
            raise KeyboardInterrupt
        return self.forward(*args, **kwargs)


def test_interrupted_run_resumes_without_recomputing(tmp_path, monkeypatch):
    tok = tiny_tokenizer()
    model = tiny_model(len(tok), arch="llama")
    task = make_task()
    kwargs = dict(token_budget=260, row_tokens=120, progress=False, state_id="tiny-state")
    fresh = sp.score_candidates(model, tok, task, CANDIDATES, task.train, **kwargs)
    per_candidate = fresh.num_batches // len(CANDIDATES)
    assert per_candidate >= 2 and fresh.num_batches == per_candidate * len(CANDIDATES)

    cache = tmp_path / "cache.json"
    backbone = model.model
    counter = CountingForward(backbone, stop_at=2 * per_candidate + 1)  # dies in the first batch of candidate 2
    monkeypatch.setattr(backbone, "forward", counter)
    with pytest.raises(KeyboardInterrupt):
        sp.score_candidates(model, tok, task, CANDIDATES, task.train, cache_path=str(cache), **kwargs)
    assert len(json.loads(cache.read_text())) == 2  # the two finished candidates, written atomically
    assert not list(tmp_path.glob("*.tmp"))

    counter = CountingForward(backbone)
    monkeypatch.setattr(backbone, "forward", counter)
    resumed = sp.score_candidates(model, tok, task, CANDIDATES, task.train, cache_path=str(cache), **kwargs)
    assert [r.cached for r in resumed.candidates] == [True, True, False, False]
    assert counter.calls == 2 * per_candidate  # only the two missing candidates ran
    strip = lambda r: {k: v for k, v in dataclasses.asdict(r).items() if k not in ("seconds", "cached")}  # noqa
    assert [strip(r) for r in resumed.candidates] == [strip(r) for r in fresh.candidates]

    counter = CountingForward(backbone)
    monkeypatch.setattr(backbone, "forward", counter)
    again = sp.score_candidates(model, tok, task, CANDIDATES, task.train, cache_path=str(cache), **kwargs)
    assert counter.calls == 0 and all(r.cached for r in again.candidates)
    # Another model state, instance set or length limit is another key: nothing is reused.
    other = sp.score_candidates(model, tok, task, CANDIDATES[:1], task.train[:3], cache_path=str(cache), **kwargs)
    assert not other.candidates[0].cached
    with pytest.raises(SapoError, match="state id"):
        sp.score_candidates(model, tok, task, CANDIDATES, task.train, cache_path=str(cache), progress=False)


def test_scoring_settings_carry_the_config_and_select_like_the_scorers_called_by_hand():
    import train_sapo

    config = train_sapo.Config(select="sapo-race", race_first=3, race_confidence=0.9, score_token_budget=260,
                               max_source_length=100, max_target_length=20)
    settings = sp.ScoringSettings.of(config)
    assert settings == sp.ScoringSettings(method="sapo-race", race_first=3, race_confidence=0.9, token_budget=260,
                                          max_length=120)
    assert sp.ScoringSettings.of(config, "sapo").method == "sapo"  # the probe: every candidate, whatever --select
    assert sp.ScoringSettings() == sp.ScoringSettings.of(train_sapo.Config(select="sapo", max_source_length=1536,
                                                                           max_target_length=128))
    tok = tiny_tokenizer()
    model = tiny_model(len(tok), arch="llama")
    task = make_task()
    def strip(selection):  # every field but the times
        record = {k: v for k, v in dataclasses.asdict(selection).items() if k not in ("seconds", "rounds")}
        return {**record, "candidates": [{k: v for k, v in c.items() if k != "seconds"} for c in record["candidates"]],
                "rounds": [{k: v for k, v in r.items() if k != "seconds"} for r in selection.to_json()["rounds"]]}

    raced = sp.select_candidates(model, tok, task, CANDIDATES, task.train, None, settings, progress=False)
    by_hand = sp.race_candidates(model, tok, task, CANDIDATES, task.train, first=3, confidence=0.9, token_budget=260,
                                 max_length=120, progress=False)
    assert raced.method == "sapo-race" and raced.max_length == 120 and strip(raced) == strip(by_hand)
    exhaustive = sp.select_candidates(model, tok, task, CANDIDATES, task.train, None,
                                      sp.ScoringSettings.of(config, "sapo"), progress=False)
    assert strip(exhaustive) == strip(sp.score_candidates(model, tok, task, CANDIDATES, task.train, token_budget=260,
                                                          max_length=120, progress=False))
    with pytest.raises(SapoError, match="unknown selection method 'best'"):
        sp.select_candidates(model, tok, task, CANDIDATES, task.train, None, sp.ScoringSettings(method="best"))


def test_model_state_id_follows_the_adapter_content(tmp_path):
    model_dir = save_tiny_model_dir(tmp_path / "model")
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    (adapter / "adapter_model.safetensors").write_bytes(b"A" * 10)
    first = model_state_id(model_dir, [str(adapter)])
    assert first == model_state_id(model_dir, [str(adapter)])
    assert first != model_state_id(model_dir, [])
    (adapter / "adapter_model.safetensors").write_bytes(b"B" * 10)  # same size, new weights
    assert first != model_state_id(model_dir, [str(adapter)])
    assert model_state_id("org/model", []) != model_state_id("org/other", [])


# ---------------------------------------------------------------------------------------------------------------------
# Paraphrases

def test_parse_paraphrase_rejects_bad_replies():
    task = make_task()
    ok = "Sure! <START>Decide whether the review below is positive or negative.</START> Hope this helps."
    assert paraphrases.parse_paraphrase(ok, task) == ("Decide whether the review below is positive or negative.", None)
    assert paraphrases.parse_paraphrase("Decide whether the review is positive or negative.", task)[1] == \
        "has no <START>...</START>"
    assert paraphrases.parse_paraphrase("<START>Decide whether the review is positive or negative.", task)[0] is None
    assert "label word" in paraphrases.parse_paraphrase("<START>Decide whether the review is good or bad.</START>", task)[1]
    assert "label word" in paraphrases.parse_paraphrase(  # case matters
        "<START>Decide whether the review is Positive or Negative.</START>", task)[1]
    assert paraphrases.parse_paraphrase("<START>   </START>", task) == (None, "is empty")
    assert paraphrases.parse_paraphrase("<START>Paraphrased: say positive or negative for the review.</START>",
                               task) == (None, "mentions paraphrasing")
    prompt = paraphrases.meta_prompt(task)
    assert task.instruction in prompt and '"positive"' in prompt and "<START>" in prompt


def test_generate_paraphrases_dedups_retries_and_caches(tmp_path, monkeypatch):
    task = make_task()
    replies = iter([
        ["<START>" + task.instruction + "</START>",  # the original itself: a duplicate
         "<START>Tell me if the review is positive or negative.</START>",
         "<START>Tell me if the review is positive or negative.</START>",  # duplicate
         "no tags at all"],
        ["<START>Is this review positive or negative? Say which.</START>",
         "<START>Judge the review: good or bad?</START>"],  # drops the label words
        ["<START>Label the review's sentiment: positive or negative.</START>"],
    ])
    asked = []

    def fake_sample(model, tokenizer, prompt, n, temperature, seed):
        asked.append(n)
        assert temperature == 0.6 and prompt == paraphrases.meta_prompt(task)  # always from the ORIGINAL instruction
        return next(replies)

    monkeypatch.setattr(paraphrases, "sample_local", fake_sample)
    cache = tmp_path / "paraphrases.json"
    got = paraphrases.generate_paraphrases(task, 3, None, None, cache_path=str(cache), paraphraser_id="fake")
    assert got == ["Tell me if the review is positive or negative.",
                   "Is this review positive or negative? Say which.",
                   "Label the review's sentiment: positive or negative."]
    assert asked == [3, 2, 1]  # each round asks for what is still missing
    monkeypatch.setattr(paraphrases, "sample_local", lambda *a, **k: pytest.fail("the cache should have answered"))
    assert paraphrases.generate_paraphrases(task, 3, None, None, cache_path=str(cache), paraphraser_id="fake") == got


CSTANCE = "判断以下文本对{对象}的态度，选择一项：A.支持，B.反对，C.中立。输出A，B或者C。"  # braces in the instruction too


def chinese_task() -> Task:
    return Task("C-STANCE", CSTANCE, "直接只回答A 或者 B 或者 C作为你的答案。", ("A", "B", "C"),
                train=[Instance("我支持\n对象：\n观点", "A")])


def test_meta_prompt_file_with_braces_and_cjk_is_filled_literally(tmp_path, monkeypatch):
    """--meta-prompt FILE: braces of the file and of the instruction stay as they are ({0}, {}, {"k": 1}, a second
    "{instruction}" inside the instruction), CJK text is kept, the instruction goes in once, the label words once; the
    replies' rejections are counted per filter in paraphrases.json."""
    task = chinese_task()
    task = dataclasses.replace(task, instruction=CSTANCE + " {instruction} {label_words} {0}")
    path = tmp_path / "元提示 {x}.txt"  # braces and CJK in the path as well
    template = ('请改写下面的指令，{0} 和 {} 以及 {"k": 1} 原样保留。\n\n<<{instruction}>>\n\n'
                '保留标签：{label_words}。答案放在 <START> 和 </START> 之间。')
    path.write_text(template, encoding="utf-8")
    custom = paraphrases.read_meta_prompt(path)
    expected = ('请改写下面的指令，{0} 和 {} 以及 {"k": 1} 原样保留。\n\n<<' + task.instruction + '>>\n\n'
                '保留标签："A", "B", "C"。答案放在 <START> 和 </START> 之间。')
    assert paraphrases.meta_prompt(task, custom) == expected  # by hand: the placeholders replaced, nothing else
    assert custom.source == str(path)

    good = ["请判断这段文本对{对象}的立场：A.支持，B.反对，C.中立。只输出A，B或者C。 {instruction} {label_words} {0}",
            "阅读文本，判断其对{对象}的态度并作答：A.支持，B.反对，C.中立，输出A，B或者C。 {instruction} {0}"]
    replies = iter([["无标签的回答",  # no <START>...</START>
                     "<START>改写后：判断文本对{对象}的态度，A.支持，B.反对，C.中立，输出A，B或者C。</START>",  # mentions it
                     "<START>判断态度：支持、反对或中立。请直接作答，不要解释原因，谢谢配合。</START>",  # drops A, B, C
                     "<START>短</START>",  # too short
                     "<START>" + good[0] + "</START>"],
                    ["<START>" + good[0] + "</START>",  # duplicate
                     "<START>" + good[1] + "</START>"]])
    prompts = []

    def fake_sample(model, tokenizer, prompt, n, temperature, seed):
        prompts.append(prompt)
        return next(replies)

    monkeypatch.setattr(paraphrases, "sample_local", fake_sample)
    cache = tmp_path / "paraphrases.json"
    got = paraphrases.generate_paraphrases(task, 2, None, None, cache_path=str(cache), paraphraser_id="fake",
                                           custom_meta_prompt=custom)
    assert got == good and prompts == [expected, expected]
    (entry,) = json.loads(cache.read_text(encoding="utf-8")).values()
    assert entry["meta_prompt"] == str(path) and entry["replies"] == 7 and entry["paraphrases"] == good
    assert entry["rejected"] == {"duplicate": 1, "label_words": 1, "length": 1, "mentions_paraphrasing": 1,
                                 "no_tags": 1}
    # Another meta-prompt is another cache entry: the built-in one does not reuse these paraphrases.
    monkeypatch.setattr(paraphrases, "sample_local", lambda *a, **k: ["<START>" + good[1] + "</START>"] * 2)
    with pytest.raises(SapoError, match="gave 1 valid of 2"):
        paraphrases.generate_paraphrases(task, 2, None, None, cache_path=str(cache), paraphraser_id="fake", max_tries=1)
    entries = json.loads(cache.read_text(encoding="utf-8"))
    failed = next(e for e in entries.values() if e["meta_prompt"] == "built-in Chinese")
    assert failed["rejected"] == {"duplicate": 1} and failed["replies"] == 2  # a failure records why


def test_pool_source_sends_the_meta_prompt_file_to_the_paraphraser(tmp_path, monkeypatch):
    """The flag's path through tasks.pools: PoolSource(meta_prompt=FILE).build asks with the file's request."""
    from tasks.pools import PoolSource

    path = tmp_path / "meta.txt"
    path.write_text("改写 {instruction}，保留 {label_words}。用 <START>...</START> 包住。", encoding="utf-8")
    task = chinese_task()
    asked = []
    rewrite = "请判断这段文本对{对象}的立场：A.支持，B.反对，C.中立。只输出A，B或者C。"

    def fake_sample(model, tokenizer, prompt, n, temperature, seed):
        asked.append(prompt)
        return ["<START>" + rewrite + "</START>"] * n

    monkeypatch.setattr(paraphrases, "sample_local", fake_sample)
    source = PoolSource(generate=1, meta_prompt=str(path))
    source.check()
    pool = source.build(task, model=None, tokenizer=None, state_id="s", cache_path=tmp_path / "paraphrases.json")
    assert pool == [task.instruction, rewrite]
    assert asked == ["改写 " + CSTANCE + '，保留 "A", "B", "C"。用 <START>...</START> 包住。']


def test_builtin_meta_prompt_follows_the_task_language():
    chinese, english = chinese_task(), make_task()
    zh = paraphrases.meta_prompt(chinese)
    assert zh.startswith("下面是交给助手的一个任务的指令：\n\n" + CSTANCE + "\n\n请用中文另写一条指令")
    assert '必须原样保留这些标签词，拼写和大小写完全一致："A", "B", "C"。' in zh and zh.count("<START>") == 1
    en = paraphrases.meta_prompt(english)
    assert en.startswith("Here is the instruction of a task given to an assistant:\n\n" + INSTRUCTION + "\n\n")
    assert 'lower case: "positive", "negative". Do not add examples' in en
    no_labels = paraphrases.meta_prompt(Task("t", "概括下面的会议记录。"))
    assert "标签词" not in no_labels and "概括下面的会议记录。" in no_labels


@pytest.mark.parametrize("text, message", [
    ("Rewrite it. <START></START>", "exactly once"),
    ("{instruction} and {instruction} <START></START>", "exactly once"),
    ("{instruction} {label_words} {label_words} <START></START>", "more than once"),
    ("{instruction} in brackets please", "<START> and </START>"),
])
def test_meta_prompt_file_errors_name_the_file(tmp_path, text, message):
    path = tmp_path / "meta.txt"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(SapoError, match=message) as info:
        paraphrases.read_meta_prompt(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(SapoError, match="not found"):
        paraphrases.read_meta_prompt(tmp_path / "missing.txt")


def test_max_length_default_is_the_training_limit():
    """score_prompts scores what train_sapo trains and scores: prompt limit + answer limit, 1536 + 128 tokens."""
    import train_sapo

    config = train_sapo.Config()
    assert sp.parse_args(["--task", "sentiment"]).max_length == config.max_source_length + config.max_target_length \
        == 1536 + 128


def test_meta_prompt_flag_is_checked_before_any_model_loads(tmp_path, capsys):
    bad = tmp_path / "meta.txt"
    bad.write_text("no placeholder", encoding="utf-8")
    for argv in (["--task", "sentiment", "--generate", "2", "--meta-prompt", str(bad)],
                 ["--task", "sentiment", "--meta-prompt", str(bad)]):
        with pytest.raises(SystemExit) as info:
            sp.main(argv)
        assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "{instruction} exactly once" in err[0] and "needs --generate K" in err[1]


def test_generate_paraphrases_on_a_tiny_model_rejects_garbage():
    tok = tiny_tokenizer()
    model = tiny_model(len(tok), arch="qwen3")
    model.generation_config.pad_token_id = tok.pad_token_id
    task = make_task()
    try:
        got = paraphrases.generate_paraphrases(task, 2, model, tok, max_tries=2, seed=0)
    except SapoError as e:
        assert "valid of 2 after 2 rounds" in str(e) and "\n" not in str(e)
    else:  # a random model that happens to produce valid rewrites must still produce only valid ones
        assert len(got) == 2 and all(paraphrases.parse_paraphrase("<START>" + g + "</START>", task)[1] is None for g in got)


def test_chat_api_request_and_errors(monkeypatch):
    seen = {}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            seen["path"], seen["auth"] = self.path, self.headers.get("Authorization")
            seen["body"] = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            payload = json.dumps({"choices": [{"message": {"content": "<START>x</START>"}}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("SAPO_API_KEY", "k123")
        url = f"http://127.0.0.1:{server.server_port}"
        assert paraphrases.chat_api(url, "m", "hello", 0.6) == "<START>x</START>"
        assert seen["path"] == "/v1/chat/completions" and seen["auth"] == "Bearer k123"
        assert seen["body"]["temperature"] == 0.6 and seen["body"]["messages"][0]["content"] == "hello"
    finally:
        server.shutdown()
    with pytest.raises(SapoError, match="unreachable"):
        paraphrases.chat_api(f"http://127.0.0.1:{free_port()}/v1", "m", "hello", 0.6, timeout=5)


# ---------------------------------------------------------------------------------------------------------------------
# Command line: bad input is one line and exit 2

@pytest.mark.parametrize("case", ["missing data dir", "unknown task", "malformed candidates"])
def test_cli_bad_input_is_one_line_and_exit_2(case, tmp_path):
    data = write_sapo_data(tmp_path / "data")
    bad = tmp_path / "bad.json"
    bad.write_text('["Classify positive or negative", ')
    args = {"missing data dir": ["--data-dir", str(tmp_path / "nope"), "--task", "tiny_sentiment"],
            "unknown task": ["--data-dir", str(data), "--task", "task_nope"],
            "malformed candidates": ["--data-dir", str(data), "--task", "tiny_sentiment", "--candidates", str(bad)]}
    proc = subprocess.run([sys.executable, "score_prompts.py", *args[case], "--output", str(tmp_path / "o.json")],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert not (tmp_path / "o.json").exists()


def test_cli_missing_train_split_points_to_dev(tmp_path):
    data = write_sapo_data(tmp_path / "data")
    (data / "tiny_sentiment" / "train.json").unlink()
    proc = subprocess.run([sys.executable, "score_prompts.py", "--data-dir", str(data), "--task", "tiny_sentiment"],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "--split dev" in proc.stderr


def test_cache_merge_keeps_what_another_run_added_and_lookup_skips_short_entries(tmp_path):
    from tasks.score_cache import cached_entries, merge_into_cache

    path = tmp_path / "score_cache.json"

    def entry(n):
        return {"task": "t", "instruction": "i", "state_id": "s", "instance_sums": [1.0] * n,
                "instance_counts": [2] * n, "seconds": 0.5}

    merge_into_cache(path, {"a": entry(3)})
    merge_into_cache(path, {"b": entry(2)})  # another scoring's write in between: both kept
    assert json.loads(path.read_text()) == {"a": entry(3), "b": entry(2)}
    assert cached_entries(path, ["b", "x", "a"], 3) == {2: entry(3)}  # b covers 2 instances only; x is not cached
    assert cached_entries(None, ["a"], 3) == {} and cached_entries(path, ["a"], 3, is_main=False) == {}
