"""One process of a 2-process sharded run on CPU (gloo), launched by tests/test_sharding.py through torchrun:

    python -m torch.distributed.run --nproc_per_node 2 tests/sharded_worker.py fsdp2|zero3|zero3-offload MODEL DIR

Under a real engine (torch FSDP2 `fully_shard`, or DeepSpeed ZeRO-3 through accelerate with DS_ACCELERATOR=cpu) it
scores candidates (score_prompts.score_candidates), generates greedy answers (evaluate.generate_answers), saves an
adapter (train_sapo.save_adapter with tasks.sharding.adapter_state_dict) and runs training steps of a new adapter
(each process its half of the global batch, tasks.train_step.SupervisedNLL), then writes what it saw to
OUT_DIR/rank<r>.pt. The test compares that with the same scenario on one process without sharding (`reference`).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root: tasks/, the scripts
sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/: tiny.py

CANDIDATES = ["Classify the sentiment of the review as positive or negative.",
              "Is the review positive or negative?",
              "Read the text and answer positive or negative for its sentiment."]
LORA_TARGETS = ["q_proj", "v_proj"]
# Plain SGD (an update proportional to the gradient, unlike AdamW's first step, lr * sign(g)) with a small clipping
# norm: every step is clipped, so the gradient AND its global norm over the shards must be right.
LR, CLIP = 1.0, 0.05
GLOBAL_BATCH = [0, 1, 2, 3]  # training instances of a step; process r takes rows r, r + 2
SCORE_BUDGET = 500  # tokens per scoring batch: 3 batches, so one process runs a discarded one (lockstep)
# ZeRO-3 with every parameter partitioned (no persistence threshold: the tiny model's norms and LoRA weights would
# otherwise stay whole) and the clipping DeepSpeed itself applies.
ZERO3_CONFIG = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "gradient_clipping": CLIP,
                "zero_allow_untested_optimizer": True,  # SGD
                "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0,
                                      "reduce_bucket_size": 4096, "stage3_prefetch_bucket_size": 4096}}
# The authors' kind of config: parameters and optimizer states offloaded to the CPU (DeepSpeed runs the client
# optimizer there; zero_force_ds_cpu_optimizer False keeps torch's, as train_sapo passes its own AdamW).
ZERO3_OFFLOAD_CONFIG = {**ZERO3_CONFIG, "zero_force_ds_cpu_optimizer": False,
                        "zero_optimization": {**ZERO3_CONFIG["zero_optimization"], "offload_param": {"device": "cpu"},
                                              "offload_optimizer": {"device": "cpu"}}}


def make_task():
    from tasks.core import Instance, Task

    answers = ["positive", "negative", "positive and negative", "negative, then positive", "positive"]
    train = [Instance("the movie was great " * (1 + i % 4) + "and {braces} stay" * (i % 2), answers[i % 5])
             for i in range(6)]
    return Task("tiny_sentiment", CANDIDATES[0], "Answer positive or negative.", ("positive", "negative"),
                train=train, dev=train[:2], test=train[:5])


def add_adapter(peft_model_or_net, name: str, seed: int):
    """A LoRA `name` with every weight drawn from a generator seeded by `seed` (B too: the adapter changes the
    outputs), the same values whatever the engine and whatever peft's own initialisation draws."""
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=LORA_TARGETS, task_type="CAUSAL_LM")
    if hasattr(peft_model_or_net, "peft_config"):
        peft_model = peft_model_or_net
        peft_model.add_adapter(name, lora)
    else:
        peft_model = get_peft_model(peft_model_or_net, lora, adapter_name=name)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in sorted(peft_model.named_parameters()):
            if f".{name}." in n:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return peft_model


def lora_weights(peft_model, name: str) -> dict[str, torch.Tensor]:
    from tasks.sharding import adapter_state_dict

    return adapter_state_dict(peft_model, name)


def training_rows(tok, task, rank: int, world: int):
    from tasks.prompts import encode_task_example
    from tasks.train_batches import supervised_tokens

    encoded = [encode_task_example(tok, task, CANDIDATES[0], inst, 256) for inst in task.train]
    mine = [[i] for i in GLOBAL_BATCH[rank::world]]
    return encoded, mine, supervised_tokens(encoded, GLOBAL_BATCH)


def reference(model_dir: str) -> dict:
    """The scenario on one process, nothing sharded: what the 2 sharded processes must reproduce."""
    import evaluate
    import score_prompts
    from accelerate import Accelerator
    from tasks.models import activate_adapters, load_model, load_tokenizer
    from tasks.train_batches import build_batch
    from tasks.train_step import SupervisedNLL, training_layout

    accelerator = Accelerator(cpu=True)
    tok, task = load_tokenizer(model_dir), make_task()
    net = load_model(model_dir, dtype=torch.float32)
    peft_model = add_adapter(net, "t0", seed=1)
    out = {"scores": score_prompts.score_candidates(net, tok, task, CANDIDATES, task.train[:5], accelerator,
                                                    token_budget=SCORE_BUDGET, progress=False),
           "answers": evaluate.generate_answers(net, tok, task, CANDIDATES[0], task.test, accelerator, batch_size=2,
                                                max_new_tokens=6, progress=False),
           "t0": lora_weights(peft_model, "t0")}
    encoded, _, total = training_rows(tok, task, 0, 1)
    for step, name in enumerate(("t1", "t2")):  # two tasks: a new adapter each, trained one step
        add_adapter(peft_model, name, seed=2 + step)
        out[name + "_init"] = lora_weights(peft_model, name)
        activate_adapters(peft_model, ["t0", name], trainable=name)
        trainable = [p for p in peft_model.parameters() if p.requires_grad]
        optimizer = torch.optim.SGD(trainable, lr=LR)
        model = SupervisedNLL(peft_model, training_layout(net)).train()
        loss = model(build_batch(encoded, [[i] for i in GLOBAL_BATCH], 0)) / total
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, CLIP)
        optimizer.step()
        out[name] = lora_weights(peft_model, name)
    net.eval()
    out["scores_after"] = score_prompts.score_candidates(net, tok, task, CANDIDATES, task.train[:5], accelerator,
                                                         token_budget=SCORE_BUDGET, progress=False)
    out["answers_after"] = evaluate.generate_answers(net, tok, task, CANDIDATES[0], task.test, accelerator,
                                                     batch_size=2, max_new_tokens=6, progress=False)
    return out


def fsdp2_shard(root, net):
    """torch FSDP2 as accelerate lays it out: each decoder layer, then the root."""
    from torch.distributed.fsdp import fully_shard

    for layer in net.model.layers:
        fully_shard(layer)
    fully_shard(root)


def run_fsdp2(model_dir: str, out_dir: Path):
    import evaluate
    import score_prompts
    import train_sapo
    from accelerate import Accelerator
    from tasks.errors import SapoError
    from tasks.models import activate_adapters, load_model, load_tokenizer
    from tasks.pools import PoolSource
    from tasks.sharding import engine_of
    from tasks.train_batches import build_batch
    from tasks.train_step import SupervisedNLL, training_layout

    accelerator = Accelerator(cpu=True)  # MULTI_CPU, gloo: processes, ranks and gather_object for the scripts
    rank, world = accelerator.process_index, accelerator.num_processes
    tok, task = load_tokenizer(model_dir), make_task()
    out = {}
    # Inference: the transformers model is the root (as score_prompts.py / evaluate.py prepare it).
    net = load_model(model_dir, dtype=torch.float32)
    peft_model = add_adapter(net, "t0", seed=1)
    fsdp2_shard(net, net)
    out["engine"] = engine_of(net)
    out["scores"] = score_prompts.score_candidates(net, tok, task, CANDIDATES, task.train[:5], accelerator,
                                                   token_budget=SCORE_BUDGET, progress=False)
    out["answers"] = evaluate.generate_answers(net, tok, task, CANDIDATES[0], task.test, accelerator, batch_size=2,
                                               max_new_tokens=6, progress=False)
    out["t0"] = lora_weights(peft_model, "t0")
    weights = out["t0"]
    if rank == 0:
        train_sapo.save_adapter(peft_model, "t0", out_dir / "adapter-t0", state_dict=weights)
    try:  # paraphrases sampled by the main process alone from sharded weights: refused on every process
        PoolSource(generate=2).build(task, accelerator=accelerator, model=net, tokenizer=tok, state_id="sharded")
        out["generate_refused"] = ""
    except SapoError as e:
        out["generate_refused"] = str(e)
    # Training: the training module is the root (accelerate's FSDP2 layout for train_sapo's SupervisedNLL). torch's
    # fully_shard applies once per module, so each task's adapter needs a model of its own here: both adapters
    # exist before sharding (t2 inactive and zero-weighted in the first step).
    net = load_model(model_dir, dtype=torch.float32)
    peft_model = add_adapter(net, "t0", seed=1)
    add_adapter(peft_model, "t1", seed=2)
    encoded, mine, total = training_rows(tok, task, rank, world)
    activate_adapters(peft_model, ["t0", "t1"], trainable="t1")
    model = SupervisedNLL(peft_model, training_layout(net)).train()
    fsdp2_shard(model, net)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trainable, lr=LR)
    # FSDP2 averages gradients over processes: * world makes the step's gradient that of sum(NLL) / total tokens
    loss = model(build_batch(encoded, mine, 0)) / total * world
    loss.backward()
    torch.nn.utils.clip_grad_norm_(trainable, CLIP)  # DTensor gradients: the norm over every shard
    optimizer.step()
    out["t1"] = lora_weights(peft_model, "t1")
    torch.save(out, out_dir / f"rank{rank}.pt")


def run_zero3(model_dir: str, out_dir: Path, offload: bool = False):
    import evaluate
    import score_prompts
    import train_sapo
    from accelerate import Accelerator
    from accelerate.utils import DeepSpeedPlugin, InitProcessGroupKwargs
    from tasks.models import activate_adapters, load_model, load_tokenizer
    from tasks.sharding import end_training, engine_of, prepare_for_training, shard_for_inference
    from tasks.train_batches import build_batch
    from tasks.train_step import SupervisedNLL, training_layout

    # gloo: on CPU accelerate would otherwise count one process (distributed-notes.md)
    config = ZERO3_OFFLOAD_CONFIG if offload else ZERO3_CONFIG
    accelerator = Accelerator(deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=config),
                              kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")])
    rank, world = accelerator.process_index, accelerator.num_processes
    tok, task = load_tokenizer(model_dir), make_task()
    out = {}
    # Loaded after the Accelerator, as train_sapo.py does: accelerate's zero3_init partitions it while loading.
    net = load_model(model_dir, dtype=torch.float32)
    out["partitioned_at_load"] = engine_of(net)
    peft_model = add_adapter(net, "t0", seed=1)
    net = shard_for_inference(accelerator, net)  # an engine without optimizer: its hooks gather module by module
    out["engine"] = engine_of(net)
    out["scores"] = score_prompts.score_candidates(net, tok, task, CANDIDATES, task.train[:5], accelerator,
                                                   token_budget=SCORE_BUDGET, progress=False)
    out["answers"] = evaluate.generate_answers(net, tok, task, CANDIDATES[0], task.test, accelerator, batch_size=2,
                                               max_new_tokens=6, progress=False)
    weights = lora_weights(peft_model, "t0")
    out["t0"] = weights
    if rank == 0:
        train_sapo.save_adapter(peft_model, "t0", out_dir / "adapter-t0", state_dict=weights)
    encoded, mine, total = training_rows(tok, task, rank, world)
    for step, name in enumerate(("t1", "t2")):  # two tasks: a new adapter each on the partitioned model
        add_adapter(peft_model, name, seed=2 + step)
        activate_adapters(peft_model, ["t0", name], trainable=name)
        trainable = [p for p in peft_model.parameters() if p.requires_grad]
        optimizer = torch.optim.SGD(trainable, lr=LR)
        model, optimizer = prepare_for_training(accelerator, SupervisedNLL(peft_model, training_layout(net)),
                                                optimizer, net)
        model.train()
        # one micro-batch per process and step: DeepSpeed steps (clipping included) inside accelerator.backward
        loss = model(build_batch(encoded, mine, 0)) / total * world
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        out[name] = lora_weights(peft_model, name)
        end_training(accelerator, net)  # as train_sapo.train_task ends: an inference engine's hooks back on
    net.eval()
    out["scores_after"] = score_prompts.score_candidates(net, tok, task, CANDIDATES, task.train[:5], accelerator,
                                                         token_budget=SCORE_BUDGET, progress=False)
    out["answers_after"] = evaluate.generate_answers(net, tok, task, CANDIDATES[0], task.test, accelerator,
                                                     batch_size=2, max_new_tokens=6, progress=False)
    torch.save(out, out_dir / f"rank{rank}.pt")


if __name__ == "__main__":
    mode, model_dir, out_dir = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    torch.manual_seed(0)
    if mode == "fsdp2":
        run_fsdp2(model_dir, out_dir)
    else:
        run_zero3(model_dir, out_dir, offload=mode == "zero3-offload")
    os._exit(0)  # the process group and DeepSpeed's threads end with the process
