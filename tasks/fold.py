"""Ours: the active LoRA adapters of a model folded into ONE LoRA, for generation and for export.

k adapters active together add sum_i s_i B_i A_i x to a module's output (s_i = alpha_i / r_i, or alpha_i / sqrt(r_i)
with rsLoRA). That is one LoRA of rank R = sum_i r_i:

    A = concat_i A_i            (R x in: the rows of every A_i)
    B = concat_i (s_i B_i)      (out x R: the columns of every B_i, each scaled by its adapter's scale)
    B A x = sum_i s_i B_i A_i x,   with scale 1 (lora_alpha = r = R)

Generation with the folded adapter runs one pair of thin matmuls per module instead of k (k kernel launches and k
reads of x become one), in fp32 like the adapters themselves; the base weights are never touched (merging into a bf16
base would round them, and the next task trains on the unrounded base). Modules that some adapters do not target get
zero rows/columns for those adapters, so every module of the union has rank R (vLLM wants one rank per adapter).

`folded_adapter(model)` is a context manager that installs the fold as a peft adapter beside the others, makes it the
only active one, and restores the previous adapters (active set and requires_grad flags) on exit; `export_folded`
writes it as a stock peft LoRA directory (adapter_config.json + adapter_model.safetensors).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tasks.errors import SapoError

if TYPE_CHECKING:
    import torch

FOLDED = "sapo_folded"  # the adapter name of the fold while it is installed


@dataclass(frozen=True)
class FoldedModule:
    A: torch.Tensor  # R x in_features, fp32
    B: torch.Tensor  # out_features x R, fp32 (each block times its adapter's scale)


@dataclass(frozen=True)
class FoldedAdapter:
    """The fold of the adapters `sources` (in the order their blocks are concatenated)."""

    modules: dict[str, FoldedModule]  # module name in the transformers model -> its folded weights
    rank: int  # R = sum of the adapters' ranks
    sources: list[str]  # the adapter names folded

    @property
    def target_suffixes(self) -> list[str]:
        return sorted({name.rsplit(".", 1)[-1] for name in self.modules})


def lora_layers(model) -> dict[str, object]:
    """name -> peft LoRA layer of every module of `model` that holds LoRA weights."""
    from peft.tuners.lora import LoraLayer

    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}


def _check_foldable(name: str, layer, adapter: str):
    from peft.tuners.lora import Linear

    if not isinstance(layer, Linear):
        raise SapoError(f"cannot fold adapter {adapter}: module {name} is a {type(layer).__name__} LoRA layer; only "
                        "Linear LoRA layers fold into one adapter")
    if adapter in layer.lora_variant or layer.use_dora.get(adapter):
        raise SapoError(f"cannot fold adapter {adapter}: module {name} uses a LoRA variant (DoRA, ...), which is not a "
                        "sum of B A products")
    if layer.lora_bias.get(adapter):
        raise SapoError(f"cannot fold adapter {adapter}: module {name} has a LoRA bias")
    if layer.merged_adapters:
        raise SapoError(f"cannot fold the adapters of {name}: {', '.join(layer.merged_adapters)} are merged into its "
                        "base weights")


def _sharded(weight) -> bool:
    """A ZeRO-3 placeholder (no elements here) or an FSDP2 DTensor shard: not a whole weight to fold."""
    return weight.numel() == 0 or type(weight).__name__ == "DTensor"


def fold_active_adapters(model) -> FoldedAdapter | None:
    """The fold of the adapters active in `model` (None when no LoRA layer has an active adapter, or when the LoRA
    weights are sharded: then generation runs the adapters unmerged, inside whatever gathers them)."""
    import torch

    layers = lora_layers(model)
    if any(_sharded(p) for layer in layers.values() for p in layer.parameters()):
        return None
    per_module = {}  # name -> [(adapter, A, s * B)]
    order: list[str] = []
    for name, layer in layers.items():
        active = [a for a in layer.active_adapters if a in layer.lora_A and a != FOLDED]
        for adapter in active:
            _check_foldable(name, layer, adapter)
            if adapter not in order:
                order.append(adapter)
        if active:
            per_module[name] = {a: (layer.lora_A[a].weight, layer.lora_B[a].weight, layer.scaling[a]) for a in active}
    if not per_module:
        return None
    ranks = {}
    for name, blocks in per_module.items():
        for adapter, (A, _, _) in blocks.items():
            if ranks.setdefault(adapter, A.shape[0]) != A.shape[0]:
                # a per-module rank (rank_pattern) would make the folded rank differ between modules
                raise SapoError(f"cannot fold adapter {adapter}: its rank differs between modules ({ranks[adapter]} "
                                f"and {A.shape[0]} in {name}); fold needs one rank per adapter")
    rank = sum(ranks.values())
    modules = {}
    with torch.no_grad():
        for name, blocks in per_module.items():
            layer = layers[name]
            out_features, in_features = layer.out_features, layer.in_features
            device = next(iter(blocks.values()))[0].device
            A_parts, B_parts = [], []
            for adapter in order:  # the same block order in every module; zeros where an adapter is absent
                if adapter in blocks:
                    A, B, scale = blocks[adapter]
                    A_parts.append(A.detach().float())
                    B_parts.append(B.detach().float() * scale)
                else:
                    A_parts.append(torch.zeros(ranks[adapter], in_features, device=device))
                    B_parts.append(torch.zeros(out_features, ranks[adapter], device=device))
            modules[name] = FoldedModule(A=torch.cat(A_parts, 0).contiguous(), B=torch.cat(B_parts, 1).contiguous())
    return FoldedAdapter(modules=modules, rank=rank, sources=order)


@contextlib.contextmanager
def folded_adapter(model):
    """Within the block, `model` runs with its active adapters folded into one (the fold is the only active adapter);
    on exit the fold is removed and the adapters' active set and requires_grad flags are as before. Yields the
    FoldedAdapter, or None when the model has no active adapter (nothing is changed then)."""
    import torch
    from peft import LoraConfig

    folded = fold_active_adapters(model)
    if folded is None:
        yield None
        return
    layers = lora_layers(model)
    saved_active = {name: list(layer.active_adapters) for name, layer in layers.items()}
    saved_grad = {id(p): p.requires_grad for layer in layers.values() for p in layer.parameters()}
    config = LoraConfig(r=folded.rank, lora_alpha=folded.rank, lora_dropout=0.0, init_lora_weights=False,
                        inference_mode=True)
    installed = []
    try:
        for name, weights in folded.modules.items():
            layer = layers[name]
            layer.update_layer(FOLDED, r=folded.rank, lora_alpha=folded.rank, config=config)
            installed.append(layer)
            # update_layer casts the new modules to the base layer's dtype; the fold stays fp32 like the adapters
            layer.lora_A[FOLDED].weight = torch.nn.Parameter(weights.A, requires_grad=False)
            layer.lora_B[FOLDED].weight = torch.nn.Parameter(weights.B, requires_grad=False)
        for name, layer in layers.items():
            # a module that no adapter is active in stays without an active adapter
            layer.set_adapter([FOLDED] if name in folded.modules else [], inference_mode=True)
        yield folded
    finally:
        for name, layer in layers.items():
            layer.set_adapter(saved_active[name], inference_mode=True)
        for layer in installed:
            layer.delete_adapter(FOLDED)
        for layer in layers.values():
            for p in layer.parameters():
                p.requires_grad = saved_grad.get(id(p), False)


def export_folded(folded: FoldedAdapter, base_model: str, out_dir) -> Path:
    """A stock peft LoRA directory: adapter_config.json (r = lora_alpha = R, target_modules = the module names' last
    parts) and adapter_model.safetensors with peft's key layout (base_model.model.<module>.lora_{A,B}.weight).
    Written into a temporary sibling and renamed, so a failed export leaves no half directory."""
    import os
    import shutil
    import tempfile

    from peft import LoraConfig
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise SapoError(f"{out_dir} exists and is not empty; export into a new directory")
    # target_modules as the names' last parts (what vLLM expects): pass a fold through covering_all_targets first so
    # that they match exactly the modules it holds
    config = LoraConfig(r=folded.rank, lora_alpha=folded.rank, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
                        target_modules=folded.target_suffixes, base_model_name_or_path=base_model)
    tensors = {}
    for name, weights in folded.modules.items():
        tensors[f"base_model.model.{name}.lora_A.weight"] = weights.A.detach().cpu().contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = weights.B.detach().cpu().contiguous()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.export-"))
    try:
        config.save_pretrained(tmp)
        save_file(tensors, tmp / "adapter_model.safetensors", metadata={"format": "pt"})
        if out_dir.exists():
            out_dir.rmdir()  # empty (checked above)
        os.rename(tmp, out_dir)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise SapoError(f"cannot write the exported adapter into {out_dir}: {e.strerror or e}") from None
    return out_dir


def covering_all_targets(model, folded: FoldedAdapter) -> FoldedAdapter:
    """`folded` plus zero blocks for the modules of `model` whose names end like the fold's targets but that no
    adapter targets (e.g. an adapter limited to some layers), so that target_modules = the names' last parts says
    exactly what the exported directory holds."""
    import torch

    suffixes = set(folded.target_suffixes)
    modules = dict(folded.modules)
    for name, module in model.named_modules():
        if name in modules or name.rsplit(".", 1)[-1] not in suffixes or any(name.startswith(m + ".") for m in modules):
            continue
        if not isinstance(module, torch.nn.Linear):
            raise SapoError(f"cannot export the fold: module {name} has a targeted name but is a "
                            f"{type(module).__name__}, not a Linear layer")
        modules[name] = FoldedModule(A=torch.zeros(folded.rank, module.in_features),
                                     B=torch.zeros(module.out_features, folded.rank))
    return FoldedAdapter(modules=modules, rank=folded.rank, sources=folded.sources)
