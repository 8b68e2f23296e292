"""Built-in tasks: deterministic, disjoint splits, answers re-derived here from the input text, paraphrase pools."""
import calendar
import re
import time

import pytest

from tasks.builtin import BUILTIN_SEQUENCES, BUILTIN_TASK_NAMES, builtin_task
from tasks.core import Task
from tasks.errors import SapoError
from tasks.prompts import IGNORE_INDEX, encode_example

SIZES = dict(n_train=300, n_dev=40, n_test=60)


@pytest.fixture(scope="module")
def tasks():
    return {name: builtin_task(name, seed=0, **SIZES) for name in BUILTIN_TASK_NAMES}


def has_word(text, word):
    return re.search(r"(?<![\w])" + re.escape(word) + r"(?![\w])", text) is not None


def words_of(text):
    return re.findall(r"[a-z]+", text.lower())


# --- independent answer derivation: one function per task, from the input text only ---------------------------------

POSITIVE = {"wonderful", "excellent", "superb", "delightful", "brilliant", "fantastic", "lovely", "amazing", "charming",
            "outstanding", "impressive", "enjoyable"}
NEGATIVE = {"terrible", "awful", "dreadful", "boring", "disappointing", "horrible", "poor", "mediocre", "annoying",
            "dull", "bland", "frustrating"}

TOPIC_CUES = {
    "sports": {"team", "striker", "goalkeeper", "tennis", "rugby", "coach", "cycling", "basketball", "championship",
               "league", "tournament", "season", "derby", "cup"},
    "science": {"researchers", "biologists", "physicist", "astronomers", "chemists", "geologists", "laboratory",
                "scientists", "galaxy", "species", "protein", "fossils", "chemical", "glaciers", "electrons",
                "vaccine"},
    "politics": {"senator", "minister", "parliament", "opposition", "governor", "lawmakers", "president", "council",
                 "tax", "election", "immigration", "constitutional", "defense", "campaign"},
    "business": {"retail", "investors", "startup", "shareholders", "airline", "bank", "maker", "company", "profits",
                 "merger", "sales", "share", "costs", "earnings"},
}

ANIMALS = {"dog", "cat", "horse", "rabbit", "fox", "owl", "goat", "parrot", "turtle", "squirrel", "donkey", "sheep",
           "duck", "deer", "frog", "hedgehog", "eagle", "lizard", "pigeon", "cow", "pig", "hamster", "goose"}


def derive_sentiment(text):
    words = words_of(text)
    pos = sum(w in POSITIVE for w in words)
    neg = sum(w in NEGATIVE for w in words)
    assert pos >= 2 or neg >= 2, text  # at least two cues of the label
    assert pos != neg, text
    return "positive" if pos > neg else "negative"


def derive_topic(text):
    words = set(words_of(text))
    hits = [topic for topic, cues in TOPIC_CUES.items() if words & cues]
    assert len(hits) == 1, (text, hits)  # cues of exactly one topic
    return hits[0]


def derive_animal(text):
    return "yes" if set(words_of(text)) & ANIMALS else "no"


def derive_compare(text):
    m = re.fullmatch(r"(\d+) and (\d+)", text)
    assert m, text
    a, b = int(m.group(1)), int(m.group(2))
    assert a != b
    return "greater" if a > b else "smaller"


def derive_count_words(text):
    return str(len(text.split()))


def derive_reverse_list(text):
    items = text.split(", ")
    assert 3 <= len(items) <= 6 and all(re.fullmatch(r"[a-z]+", w) for w in items), text
    return ", ".join(items[::-1])


def derive_sort_numbers(text):
    items = text.split(", ")
    assert all(re.fullmatch(r"\d+", x) for x in items), text
    return ", ".join(str(x) for x in sorted(int(x) for x in items))


def derive_capitals(text):
    caps = [w.strip(".,!?") for w in text.split() if w[0].isupper()]
    assert caps, text
    return ", ".join(caps)


def derive_arithmetic(text):
    m = re.match(r"[A-Z][a-z]+ has (\d+) [a-z]+\.", text)
    assert m, text
    total = int(m.group(1))
    for op in re.finditer(r"(buys|finds|receives|collects) (\d+) more|(gives away|loses|sells) (\d+)", text):
        if op.group(1):
            total += int(op.group(2))
        else:
            total -= int(op.group(4))
        assert total >= 0, text
    assert text.endswith("have now?"), text
    return str(total)


def derive_date_format(text):
    m = re.search(r"(\d{4})-(\d{2})-(\d{2})", text)
    assert m, text
    year, month, day = int(m.group(1)), int(m.group(2)), int(m.group(3))
    assert 1 <= day <= calendar.monthrange(year, month)[1], text  # a real date
    return calendar.month_name[month] + " " + str(day) + ", " + str(year)


DERIVE = {"sentiment": derive_sentiment, "topic": derive_topic, "animal": derive_animal, "compare": derive_compare,
          "count_words": derive_count_words, "reverse_list": derive_reverse_list,
          "sort_numbers": derive_sort_numbers, "capitals": derive_capitals, "arithmetic": derive_arithmetic,
          "date_format": derive_date_format}

NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
                "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen", "twenty"]


def all_instances(task: Task):
    return task.train + task.dev + task.test


# --- tests -------------------------------------------------------------------------------------------------------------


def test_names_and_mix():
    assert len(BUILTIN_TASK_NAMES) >= 8 and len(set(BUILTIN_TASK_NAMES)) == len(BUILTIN_TASK_NAMES)
    assert set(DERIVE) == set(BUILTIN_TASK_NAMES), "every built-in task needs an answer check here"
    tasks = [builtin_task(n, n_train=1, n_dev=1, n_test=1) for n in BUILTIN_TASK_NAMES]
    assert sum(bool(t.label_words) for t in tasks) >= 3  # classification
    assert sum(not t.label_words for t in tasks) >= 3  # generation


def test_task_fields(tasks):
    for name, task in tasks.items():
        assert task.name == name and task.source == "builtin"
        assert task.instruction.strip() == task.instruction and task.suffix
        assert not task.missing_splits
        assert isinstance(task.label_words, tuple)
        for w in task.label_words:  # the instruction and the suffix name every label
            assert has_word(task.instruction, w), (name, w)
            assert has_word(task.suffix, w), (name, w)


def test_sizes_as_requested(tasks):
    for task in tasks.values():
        assert (len(task.train), len(task.dev), len(task.test)) == (300, 40, 60)
    t = builtin_task("sentiment", n_train=7, n_dev=0, n_test=3)
    assert (len(t.train), len(t.dev), len(t.test)) == (7, 0, 3)
    with pytest.raises(SapoError):
        t.split("dev")  # empty split: a clear error when used


def test_deterministic_and_seed_dependent(tasks):
    for name, task in tasks.items():
        again = builtin_task(name, seed=0, **SIZES)
        assert again.train == task.train and again.dev == task.dev and again.test == task.test
        assert again.content_hash() == task.content_hash()
        other = builtin_task(name, seed=1, **SIZES)
        assert other.train != task.train and other.test != task.test
        assert other.content_hash() != task.content_hash()


def test_prefix_stable_across_sizes(tasks):
    # A split's first k instances do not depend on how many of each split were asked for.
    for name, task in tasks.items():
        small = builtin_task(name, seed=0, n_train=20, n_dev=5, n_test=10)
        assert small.train == task.train[:20] and small.dev == task.dev[:5] and small.test == task.test[:10]


def test_splits_disjoint_and_without_repeats(tasks):
    for name, task in tasks.items():
        tr, dv, te = ({i.input for i in s} for s in (task.train, task.dev, task.test))
        assert len(tr) == len(task.train) and len(dv) == len(task.dev) and len(te) == len(task.test), name
        assert not (tr & dv) and not (tr & te) and not (dv & te), name
        # also across seeds: no test input of seed 0 is a train input of seed 1
        other = builtin_task(name, seed=1, **SIZES)
        assert not ({i.input for i in other.train} & te), name


def test_answers_correct_by_construction(tasks):
    for name, task in tasks.items():
        derive = DERIVE[name]
        for inst in all_instances(task):
            assert inst.outputs and all(isinstance(o, str) and o.strip() == o and o for o in inst.outputs)
            assert len(set(inst.outputs)) == len(inst.outputs)
            assert inst.label == derive(inst.input), (name, inst)
            if task.label_words:
                assert inst.outputs == (inst.label,) and inst.label in task.label_words, (name, inst)
            if name in ("count_words", "arithmetic"):  # other references: the number in words
                n = int(inst.label)
                if n <= 20:
                    assert NUMBER_WORDS[n] in inst.outputs, inst


def test_classification_labels_all_occur(tasks):
    for task in tasks.values():
        if task.label_words:
            seen = {i.label for i in task.train}
            assert seen == set(task.label_words), task.name
            counts = [sum(i.label == w for i in task.train) for w in task.label_words]
            assert min(counts) >= 0.5 * len(task.train) / len(task.label_words), (task.name, counts)


def test_inputs_and_answers_short(tasks):
    for task in tasks.values():
        for inst in all_instances(task):
            assert 1 <= len(inst.input.split()) <= 40, inst
            assert len(inst.label.split()) <= 10, inst


def test_paraphrase_pools(tasks):
    for name, task in tasks.items():
        paras = task.paraphrases
        assert isinstance(paras, tuple) and len(paras) >= 20, name
        assert len(set(paras)) == len(paras), name
        assert task.instruction not in paras, name
        n0 = len(task.instruction)
        for p in paras:
            assert p == p.strip() and p, (name, p)
            assert p != task.instruction
            assert p.count(task.instruction) == 0
            assert "paraphras" not in p.lower() and "instruction" not in p.lower(), (name, p)
            assert 0.25 * n0 <= len(p) <= max(4 * n0, 200), (name, p)
            for w in task.label_words:
                assert has_word(p, w), (name, w, p)


def test_paraphrases_pass_the_project_validator(tasks):
    from tasks import candidates
    for task in tasks.values():
        for p in task.paraphrases:
            assert candidates.candidate_problem(task, p) is None, (task.name, p)


def test_sequences():
    assert len(BUILTIN_SEQUENCES["demo"]) == 3 and len(BUILTIN_SEQUENCES["builtin"]) == 5
    for name, seq in BUILTIN_SEQUENCES.items():
        assert seq and all(t in BUILTIN_TASK_NAMES for t in seq), name
        assert len(set(seq)) == len(seq), name
    kinds = {bool(builtin_task(t, n_train=1, n_dev=1, n_test=1).label_words) for t in BUILTIN_SEQUENCES["demo"]}
    assert kinds == {True, False}, "demo mixes classification and generation"


def test_unknown_name():
    with pytest.raises(SapoError) as err:
        builtin_task("no_such_task")
    msg = str(err.value)
    assert "\n" not in msg and "no_such_task" in msg
    assert all(n in msg for n in BUILTIN_TASK_NAMES)
    with pytest.raises(SapoError):
        builtin_task("sentiment", n_train=-1)


def test_generation_is_fast():
    start = time.perf_counter()
    for name in BUILTIN_TASK_NAMES:
        builtin_task(name, seed=3, n_train=1000, n_dev=50, n_test=100)
    assert time.perf_counter() - start < 2.0


def test_prompt_encoding(tasks):
    from tiny import tiny_tokenizer

    tok = tiny_tokenizer()
    for task in tasks.values():
        inst = task.train[0]
        for instruction in (task.instruction, task.paraphrases[-1]):
            enc = encode_example(tok, instruction, inst.input, task.suffix, inst.label)
            n = enc.num_prompt_tokens
            assert len(enc.input_ids) == len(enc.labels) and 0 < n < len(enc.input_ids)
            assert all(label == IGNORE_INDEX for label in enc.labels[:n])
            assert enc.labels[n:] == enc.input_ids[n:]
            assert tok.decode(enc.input_ids[n:]) == inst.label + "<|im_end|>\n"
            prompt = tok.decode(enc.input_ids[:n])
            assert (instruction + "\n\nText:\n" + inst.input + "\n\n" + task.suffix) in prompt
    # braces in an instruction stay as they are
    topic = tasks["topic"]
    braced = next(p for p in topic.paraphrases if "{" in p)
    enc = encode_example(tok, braced, topic.test[0].input, topic.suffix, topic.test[0].label)
    assert braced in tok.decode(enc.input_ids[:enc.num_prompt_tokens])
