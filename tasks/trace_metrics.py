"""TRACE's own per-task scores, as TRACE's code defines them (github BeyonderXX/TRACE: metrics.py and
evaluations/eval_<task>.py), so that a TRACE run's R holds the numbers TRACE's tables report.

| task                   | TRACE's score   | definition (one prediction p, one reference r)                     |
|------------------------|-----------------|--------------------------------------------------------------------|
| C-STANCE, FOMC,        | accuracy        | p == r, the strings as they are (no case folding, no normalising)  |
| NumGLUE-cm, NumGLUE-ds |                 |                                                                    |
| ScienceQA              | accuracy        | p[0] == r[0]: eval_ScienceQA.resolve takes the first character as  |
|                        |                 | the answer letter ("B" of "B\\nBecause ...")                       |
| Py150                  | edit similarity | fuzzywuzzy's fuzz.ratio(post(p), post(r)), an integer 0..100       |
| MeetingBank            | ROUGE-L         | the `rouge` package's (1.0.1, pinned in TRACE) rouge-l "f"         |

Each score is x100 (accuracy and ROUGE-L are 0..1 in TRACE's code, the edit similarity already 0..100). TRACE skips
a pair whose prediction or reference is empty but still divides by the number of instances: such a pair scores 0, and
a task's score is the plain mean over its instances, as here. Where TRACE's code would crash (ScienceQA's p[0] on an
empty answer, `rouge` on a text without words) the pair scores 0.

Details kept literally:
- Py150 post-processing (eval_Py150.postprocess): "<NUM_LIT>" -> "0", "<STR_LIT>" and "<CHAR_LIT>" -> "", then each
  "<STR_LIT:v>" / "<NUM_LIT:v>" / "<CHAR_LIT:v>" -> v; applied to prediction and reference alike, before the
  emptiness check.
- fuzz.ratio(p, r): 100 when p == r, 0 when either is empty, else int(round(100 * SequenceMatcher(None, p, r).ratio()))
  (Python's round: halves to even). TRACE's requirements install fuzzywuzzy without python-Levenshtein, and then
  fuzzywuzzy's SequenceMatcher is the standard library's difflib one (autojunk on, as by default), used here; with
  python-Levenshtein installed fuzzywuzzy would use the Levenshtein ratio instead, which differs on some pairs.
- ROUGE-L: TRACE calls rouge.Rouge(metrics=["rouge-l"]).get_scores(r, p, avg=True), the REFERENCE in the hypothesis
  slot; kept (the package's summary-level union LCS over "."-split sentences and its distinct-word counts are not
  symmetric in their arguments). No stemming, no lower-casing, words split on spaces.
- The answers are the project's (the generated tokens, decoded and stripped: evaluate.generate_answers), where TRACE
  compares the raw decoded text: a leading space that TRACE's decoding keeps would fail its exact match, not ours.

The authors of SAPO meant to report these and never did (their TRACE metric keys do not match, so their code reports
zeros); other task names have no TRACE definition (20Minuten's SARI and Papyrus-f's F1 are not implemented here).
"""
from __future__ import annotations

import difflib
import re

# Task name -> the score TRACE reports for it (the names of TRACE's data folders, as in the authors' TRACE/ copy).
TRACE_METRICS = {
    "C-STANCE": "accuracy",
    "FOMC": "accuracy",
    "MeetingBank": "rouge-L",
    "Py150": "edit_similarity",
    "ScienceQA": "accuracy (answer letter)",
    "NumGLUE-cm": "accuracy",
    "NumGLUE-ds": "accuracy",
}


def trace_metric(task_name: str) -> str | None:
    """The name of TRACE's score for a task, or None when TRACE defines none for it."""
    return TRACE_METRICS.get(task_name)


def accuracy(prediction: str, reference: str) -> float:
    """metrics.caculate_accuracy for one pair: 100 when both are non-empty and equal as strings, else 0."""
    return 100.0 if prediction and reference and prediction == reference else 0.0


def answer_letter_accuracy(prediction: str, reference: str) -> float:
    """eval_ScienceQA: accuracy of the first characters (the answer letter)."""
    return accuracy(prediction[:1], reference[:1])


_LITERAL = re.compile(r"<(STR|NUM|CHAR)_LIT:(.*?)>", re.S)


def py150_postprocess(code: str) -> str:
    """eval_Py150.postprocess: literal placeholders of the Py150 token stream turned back into code text."""
    code = code.replace("<NUM_LIT>", "0").replace("<STR_LIT>", "").replace("<CHAR_LIT>", "")
    for kind, value in _LITERAL.findall(code):  # found once, then replaced one after another, as TRACE does
        code = code.replace(f"<{kind}_LIT:{value}>", value)
    return code


def fuzz_ratio(a: str, b: str) -> int:
    """fuzzywuzzy 0.18's fuzz.ratio(a, b) with difflib's SequenceMatcher (no python-Levenshtein)."""
    if a == b:
        return 100
    if not a or not b:
        return 0
    return int(round(100 * difflib.SequenceMatcher(None, a, b).ratio()))


def edit_similarity(prediction: str, reference: str) -> float:
    """metrics.caculate_fuzz for one pair after eval_Py150's post-processing of both."""
    prediction, reference = py150_postprocess(prediction), py150_postprocess(reference)
    if not prediction or not reference:
        return 0.0
    return float(fuzz_ratio(prediction, reference))


def rouge_l_trace(prediction: str, reference: str) -> float:
    """metrics.caculate_rouge for one pair: the `rouge` package's ROUGE-L f x 100, reference as the hypothesis."""
    if not prediction or not reference:
        return 0.0
    from rouge import Rouge

    try:
        return 100.0 * Rouge(metrics=["rouge-l"]).get_scores(reference, prediction, avg=True)["rouge-l"]["f"]
    except ValueError:  # a text that splits into no sentence ("..."): TRACE's code would stop here
        return 0.0


_SCORERS = {"accuracy": accuracy, "accuracy (answer letter)": answer_letter_accuracy,
            "edit_similarity": edit_similarity, "rouge-L": rouge_l_trace}


def trace_score(task_name: str, prediction: str, references) -> float:
    """TRACE's score (x100) of one prediction for a task TRACE defines one for, max over the references (TRACE's data
    has one per instance). A KeyError for any other task: check trace_metric() first."""
    scorer = _SCORERS[TRACE_METRICS[task_name]]
    if isinstance(references, str):
        references = [references]
    return max(scorer(prediction, reference) for reference in references)
