"""Hugging Face <-> native parameter names for DeepSeek-V3, one native tensor at a time.

Each native tensor has a `KeyPlan`: the HF tensors it is made of and how (renamed, gate+up
concatenated, experts stacked). Working per native tensor lets conversion stream: a reader
fetches only the HF tensors of one plan (from whichever shards hold them), so memory stays at
one native tensor, one MoE layer's stacked experts at most.

HF layout (DeepSeek's own checkpoints and transformers' ``DeepseekV3ForCausalLM``):

- ``model.embed_tokens``, ``model.layers.{i}.*``, ``model.norm``, ``lm_head`` (absent when tied);
- separate ``gate_proj`` / ``up_proj``; routed experts one by one as ``mlp.experts.{e}.*``;
- MTP depth ``d`` as extra layer ``model.layers.{L + d}`` holding a full block plus ``enorm``,
  ``hnorm``, ``eh_proj``, ``shared_head.norm`` and copies of the embedding (``embed_tokens``) and
  the output head (``shared_head.head``). We share those two with the main model: the copies are
  written on save and ignored on load.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from .config import DeepseekV3Config

_LAYER = re.compile(r"^layers\.(\d+)\.(.*)$")
_MTP = re.compile(r"^mtp\.(\d+)\.(.*)$")
_MTP_OWN = {"enorm.weight": "enorm.weight", "hnorm.weight": "hnorm.weight", "eh_proj.weight": "eh_proj.weight",
            "norm.weight": "shared_head.norm.weight"}


@dataclass(frozen=True)
class KeyPlan:
    """How one native tensor is built from (and split back into) HF tensors.

    ``kind``: "rename" (one key), "gate_up" ([gate, up] concatenated on dim 0), "experts_gate_up"
    ([gate_0, up_0, gate_1, up_1, ...] -> [E, 2I, hidden]) or "experts" ([w_0, w_1, ...] stacked).
    """

    kind: str
    hf_keys: tuple[str, ...]

    def to_native(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        if self.kind == "rename":
            return tensors[0]
        if self.kind == "gate_up":
            return torch.cat(tensors, dim=0)
        if self.kind == "experts_gate_up":
            return torch.stack([torch.cat(tensors[i:i + 2], dim=0) for i in range(0, len(tensors), 2)])
        return torch.stack(tensors)

    def to_hf(self, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.kind == "rename":
            parts = [tensor]
        elif self.kind == "gate_up":
            parts = list(tensor.chunk(2, dim=0))
        elif self.kind == "experts_gate_up":
            parts = [half for expert in tensor.unbind(0) for half in expert.chunk(2, dim=0)]
        else:
            parts = list(tensor.unbind(0))
        return {key: part.contiguous() for key, part in zip(self.hf_keys, parts)}


def _block_plan(rest: str, hf_prefix: str, config: DeepseekV3Config) -> KeyPlan:
    """Plan for a key ``rest`` inside a block whose HF prefix is ``model.layers.{n}.``."""
    if rest.endswith("gate_up_proj.weight"):  # dense MLP or shared experts
        base = hf_prefix + rest[: -len("gate_up_proj.weight")]
        return KeyPlan("gate_up", (base + "gate_proj.weight", base + "up_proj.weight"))
    if rest == "mlp.experts.gate_up_proj":
        keys = tuple(f"{hf_prefix}mlp.experts.{e}.{proj}.weight"
                     for e in range(config.n_routed_experts) for proj in ("gate_proj", "up_proj"))
        return KeyPlan("experts_gate_up", keys)
    if rest == "mlp.experts.down_proj":
        return KeyPlan("experts", tuple(f"{hf_prefix}mlp.experts.{e}.down_proj.weight"
                                        for e in range(config.n_routed_experts)))
    return KeyPlan("rename", (hf_prefix + rest,))


def plan(native_key: str, config: DeepseekV3Config) -> KeyPlan:
    """The `KeyPlan` of a native parameter or buffer name."""
    if native_key in ("embed_tokens.weight", "norm.weight"):
        return KeyPlan("rename", ("model." + native_key,))
    if native_key == "lm_head.weight":
        return KeyPlan("rename", ("lm_head.weight",))
    if m := _LAYER.match(native_key):
        return _block_plan(m.group(2), f"model.layers.{m.group(1)}.", config)
    if m := _MTP.match(native_key):
        prefix = f"model.layers.{config.num_hidden_layers + int(m.group(1))}."
        rest = m.group(2)
        if rest in _MTP_OWN:
            return KeyPlan("rename", (prefix + _MTP_OWN[rest],))
        if rest.startswith("block."):
            return _block_plan(rest[len("block."):], prefix, config)
    raise KeyError(f"no HF name for native tensor '{native_key}'")


def hf_copies(native_key: str, config: DeepseekV3Config) -> list[str]:
    """HF names that hold extra copies of a shared native tensor (the MTP layers' embedding and head)."""
    mtp_layers = [f"model.layers.{config.num_hidden_layers + d}." for d in range(config.num_nextn_predict_layers)]
    head_key = "embed_tokens.weight" if config.tie_word_embeddings else "lm_head.weight"
    copies = []
    if native_key == "embed_tokens.weight":
        copies += [p + "embed_tokens.weight" for p in mtp_layers]
    if native_key == head_key:
        copies += [p + "shared_head.head.weight" for p in mtp_layers]
    return copies


def hf_mtp_depth(hf_keys: set[str] | list[str], num_hidden_layers: int) -> int:
    """How many MTP layers a HF checkpoint holds (``model.layers.{L + d}.eh_proj.weight`` present)."""
    keys = set(hf_keys)
    depth = 0
    while f"model.layers.{num_hidden_layers + depth}.eh_proj.weight" in keys:
        depth += 1
    return depth
