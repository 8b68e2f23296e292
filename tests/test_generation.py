"""Generation batches by token budget (tasks/generation.py): the plan on hand-checked lengths; the decode loop that
drops finished sequences gives HF generate's unbatched greedy answers; the static-cache path (without compile on
CPU) gives the plain path's answers; 1 and 2 processes (real `accelerate launch`) agree on a folded adapter stack."""
import json
import os
import subprocess
import sys

import torch

import evaluate
from tasks.generation import DecodeStats, greedy_decode, hf_generate, plan_batches
from tasks.prompts import encode_prompt
from test_evaluate import INPUTS, accelerator, free_port, make_task, reference_answer, write_data_dir  # noqa: F401
from test_fold import write_stack
from tiny import tiny_model, tiny_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_plan_fills_the_budget_longest_first():
    lengths = [10, 50, 30, 30, 5, 200, 8]
    plan = plan_batches(lengths, max_new_tokens=10, token_budget=130)
    # longest first: 200 (alone: 210 > 130); 50, 30 (2 x 60 = 120; + 30 -> 3 x 60 = 180 no); 30, 10, 8 (3 x 40 =
    # 120; + 5 -> 4 x 40 = 160 no); 5
    assert plan.batches == [[5], [1, 2], [3, 0, 6], [4]]
    for batch in plan.batches[1:]:
        assert len(batch) * (lengths[batch[0]] + 10) <= 130
    order = [i for batch in plan.batches for i in batch]
    assert sorted(order) == list(range(len(lengths))) and [lengths[i] for i in order] == sorted(lengths, reverse=True)
    assert plan_batches(lengths, 10, token_budget=10**6, max_sequences=3).batches == [[5, 1, 2], [3, 0, 6], [4]]
    assert plan_batches(lengths, 10).batches == [[5, 1, 2, 3, 0, 6, 4]]  # no budget: batches of 256


def test_dropping_finished_sequences_gives_the_unbatched_answers(one_thread):
    tokenizer = tiny_tokenizer()
    model = tiny_model(len(tokenizer))
    task = make_task(INPUTS)
    prompts = [encode_prompt(tokenizer, task.instruction, i.input, task.suffix) for i in task.test]
    max_new = 10
    free = [reference_answer(model, tokenizer, task, inst, max_new)[0] for inst in task.test]
    # stop tokens that end the answers at different steps: the batch shrinks as they finish
    stops = sorted({tokens[k] for tokens, k in zip(free, (1, 4, 7, 2, 9)) if len(tokens) > k})
    stats = DecodeStats()
    rows = greedy_decode(model, prompts, tokenizer.pad_token_id, stops, max_new, stats=stats)
    from transformers import GenerationConfig

    for prompt, row in zip(prompts, rows):
        alone = model.generate(input_ids=torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=int),
                               generation_config=GenerationConfig(do_sample=False, max_new_tokens=max_new,
                                                                  eos_token_id=stops, pad_token_id=0))
        assert row == alone[0, len(prompt):].tolist()
    assert stats.sequence_steps < stats.steps * len(prompts)  # rows did leave the batch
    assert len({len(r) for r in rows}) > 1


def test_token_budget_batches_equal_batch_one(one_thread, accelerator):  # noqa: F811
    tokenizer = tiny_tokenizer()
    model = tiny_model(len(tokenizer))
    task = make_task(INPUTS * 2)
    lengths = sorted(len(encode_prompt(tokenizer, task.instruction, i.input, task.suffix)) for i in task.test)
    budget = 3 * (lengths[len(lengths) // 2] + 8)  # batches of 1 to 4 sequences
    plan = plan_batches(lengths, 8, token_budget=budget)
    assert len({len(b) for b in plan.batches}) > 1 and max(len(b) for b in plan.batches) > 2
    budgeted = evaluate.generate_answers(model, tokenizer, task, task.instruction, task.test, accelerator,
                                         max_new_tokens=8, token_budget=budget, progress=False)
    single = evaluate.generate_answers(model, tokenizer, task, task.instruction, task.test, accelerator,
                                       max_new_tokens=8, batch_size=1, token_budget=None, progress=False)
    assert budgeted == single
    assert budgeted == [reference_answer(model, tokenizer, task, inst, 8)[1] for inst in task.test]


def test_static_cache_path_equals_plain_path(one_thread):
    tokenizer = tiny_tokenizer()
    model = tiny_model(len(tokenizer))
    task = make_task(INPUTS)
    prompts = [encode_prompt(tokenizer, task.instruction, i.input, task.suffix) for i in task.test]
    stops = [tokenizer.convert_tokens_to_ids("<|im_end|>")]
    pad = tokenizer.pad_token_id
    static = hf_generate(model, prompts, pad, stops, 8, static=True, compile=False)  # CPU: static cache, no compile
    plain = greedy_decode(model, prompts, pad, stops, 8)
    dynamic = hf_generate(model, prompts, pad, stops, 8)

    def cut(row):
        return row[:next((k for k, t in enumerate(row) if t in stops), len(row))]

    assert [cut(r) for r in static] == [cut(r) for r in plain] == [cut(r) for r in dynamic]
    assert any(cut(r) for r in plain)


def test_one_vs_two_processes_with_a_folded_stack_and_a_token_budget(tmp_path, one_thread):
    _, task_dir = write_stack(tmp_path, 3)
    data = write_data_dir(tmp_path / "data", n_test=9)
    args = ["--model", str(task_dir), "--tasks", "alpha_task,beta_task", "--data-dir", str(data),
            "--max-new-tokens", "6", "--eval-token-budget", "120", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1", "HF_HUB_OFFLINE": "1"}
    evaluate.main([*args, "--output-dir", str(tmp_path / "one")])
    two = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                          "--main_process_port", str(free_port()), "evaluate.py", *args,
                          "--output-dir", str(tmp_path / "two")],
                         capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    unmerged = tmp_path / "unmerged"
    evaluate.main([*args, "--output-dir", str(unmerged), "--no-fold", "--eval-token-budget", "100000",
                   "--batch-size", "1"])
    for task in ("alpha_task", "beta_task"):
        one = (tmp_path / "one" / "predictions" / f"{task}.jsonl").read_text(encoding="utf-8")
        assert one == (tmp_path / "two" / "predictions" / f"{task}.jsonl").read_text(encoding="utf-8")
        assert one == (unmerged / "predictions" / f"{task}.jsonl").read_text(encoding="utf-8")
        assert len(one.splitlines()) == 9
    scores = json.loads((tmp_path / "one" / "scores.json").read_text())
    assert scores == json.loads((tmp_path / "two" / "scores.json").read_text())
