"""Find the prunable structure of any causal LM: decoder blocks, attention and MLP linears, heads.

Structure is discovered from module types and config fields; the only hand-written table is the
mapping from a linear's leaf name to its role (`ROLE_BY_NAME`), kept here in one place.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from workbench.errors import UnsupportedModelError

# Leaf module name -> role. "o"/"down" for names shared by attention and MLP (GPT-2's c_proj,
# the "dense" projections) are resolved by the parent path in `_role_of`.
ROLE_BY_NAME = {
    "q_proj": "q", "query": "q", "q": "q", "wq": "q",
    "k_proj": "k", "key": "k", "k": "k", "wk": "k",
    "v_proj": "v", "value": "v", "v": "v", "wv": "v",
    "o_proj": "o", "out_proj": "o", "wo": "o", "dense": "o", "c_proj": "o",
    "query_key_value": "qkv", "Wqkv": "qkv", "c_attn": "qkv", "qkv_proj": "qkv", "W_pack": "qkv",
    "gate_proj": "gate", "w1": "gate", "gate_up_proj": "gate_up",
    "up_proj": "up", "fc1": "up", "fc_in": "up", "dense_h_to_4h": "up", "c_fc": "up", "w3": "up",
    "down_proj": "down", "fc2": "down", "fc_out": "down", "dense_4h_to_h": "down", "w2": "down",
}
ATTENTION_ROLES = ("q", "k", "v", "qkv", "o")
_ATTENTION_PARENT = re.compile(r"attn|attention", re.IGNORECASE)
_MLP_NAMES_IN_ATTENTION = {"c_proj": "o", "dense": "o"}
_MLP_NAMES_IN_MLP = {"c_proj": "down", "dense": "down"}


class UnsupportedArchitectureError(UnsupportedModelError):
    """The model's structure could not be mapped onto blocks, attention and MLP linears."""


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, Conv1D))


def weight_of(module: nn.Module) -> torch.Tensor:
    """The weight as (out_features, in_features), a view of the parameter's data."""
    return module.weight.data.t() if isinstance(module, Conv1D) else module.weight.data


def set_weight(module: nn.Module, weight: torch.Tensor) -> None:
    """Write an (out_features, in_features) matrix back into the module in place."""
    target = weight_of(module)
    target.copy_(weight.to(target.dtype))


def replace_weight(module: nn.Module, weight: torch.Tensor) -> None:
    """Give the module an (out_features, in_features) matrix as its weight: the tensor itself
    where the parameter can take it as is (a plain linear's weight of the same dtype, device and
    shape), else copied in place. Taking it spares a copy and, for weights memory-mapped from a
    checkpoint, a page fault on the first write to every page (1.2 s for the bundled model)."""
    param = module.weight
    if not isinstance(module, Conv1D) and weight.is_contiguous() and weight.dtype == param.dtype \
            and weight.device == param.device and weight.shape == param.shape:
        param.data = weight
    else:
        set_weight(module, weight)


def in_out_features(module: nn.Module) -> tuple[int, int]:
    out_features, in_features = weight_of(module).shape
    return in_features, out_features


@dataclass
class LinearInfo:
    name: str  # path inside the block, e.g. "self_attn.q_proj"
    full_name: str  # path inside the model, e.g. "model.layers.0.self_attn.q_proj"
    role: str  # q, k, v, qkv, o, gate, up, down
    group: str  # "attention" or "mlp"
    module: nn.Module = field(repr=False)

    @property
    def kind(self) -> str:
        """The family's own leaf name (q_proj, fc1, c_attn, ...): the heatmap's column label."""
        return self.name.rsplit(".", 1)[-1]


@dataclass
class BlockInfo:
    index: int
    name: str
    module: nn.Module = field(repr=False)
    linears: list[LinearInfo]
    unmapped: list[str] = field(default_factory=list)  # linears with no known role: never pruned

    def select(self, scope: str = "all") -> list[LinearInfo]:
        if scope == "all":
            return list(self.linears)
        if scope in ("attention", "mlp"):
            return [lin for lin in self.linears if lin.group == scope]
        raise ValueError(f"unknown scope {scope!r}: use 'all', 'attention' or 'mlp'")

    def by_role(self, role: str) -> list[LinearInfo]:
        return [lin for lin in self.linears if lin.role == role]


@dataclass
class ModelLayout:
    family: str  # config.model_type
    blocks_name: str  # e.g. "model.layers"
    blocks: list[BlockInfo]
    hidden_size: int
    intermediate_size: int | None
    num_heads: int
    num_kv_heads: int
    head_dim: int
    embedding_names: list[str]
    head_name: str | None  # the LM head, never pruned unless asked

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    def summary(self) -> dict:
        roles = sorted({lin.kind for b in self.blocks for lin in b.linears})
        return {
            "family": self.family,
            "blocks": self.num_blocks,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "heads": self.num_heads,
            "kv_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "prunable_linears_per_block": roles,
        }


def _config_value(config, *names, default=None):
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return default


def _find_blocks(model: nn.Module, num_layers: int | None) -> tuple[str, nn.ModuleList]:
    """The ModuleList of decoder blocks: same-class children each holding linears."""
    candidates = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        classes = {type(child) for child in module}
        if len(classes) != 1 or is_linear(module[0]):
            continue
        if not any(is_linear(m) for m in module[0].modules()):
            continue
        candidates.append((name, module))
    if num_layers is not None:
        exact = [c for c in candidates if len(c[1]) == num_layers]
        candidates = exact or candidates
    if not candidates:
        raise UnsupportedArchitectureError(
            f"{type(model).__name__}: found no list of decoder blocks (an nn.ModuleList of identical "
            "modules containing Linear layers). This architecture is not supported."
        )
    return max(candidates, key=lambda c: len(c[1]))


def _role_of(path: str) -> tuple[str, str] | None:
    """(role, group) for a linear at `path` inside a block, or None if it is not prunable."""
    parts = path.split(".")
    leaf, parents = parts[-1], parts[:-1]
    in_attention = any(_ATTENTION_PARENT.search(p) for p in parents)
    if leaf in _MLP_NAMES_IN_ATTENTION:
        role = _MLP_NAMES_IN_ATTENTION[leaf] if in_attention else _MLP_NAMES_IN_MLP[leaf]
    else:
        role = ROLE_BY_NAME.get(leaf)
    if role is None:
        return None
    group = "attention" if role in ATTENTION_ROLES else "mlp"
    return role, group


def _num_kv_heads(config, num_heads: int) -> int:
    if getattr(config, "model_type", "") == "falcon":
        if getattr(config, "new_decoder_architecture", False):
            return config.num_kv_heads
        return 1 if getattr(config, "multi_query", False) else num_heads
    kv = _config_value(config, "num_key_value_heads", "num_kv_heads", "n_head_kv")
    attn_config = getattr(config, "attn_config", None)
    if kv is None and attn_config is not None:
        kv = getattr(attn_config, "kv_n_heads", None)
    return int(kv) if kv else num_heads


def describe(model: nn.Module) -> ModelLayout:
    """Map a causal LM onto blocks, linears and head geometry, or raise a clear error."""
    config = model.config
    num_layers = _config_value(config, "num_hidden_layers", "n_layer", "n_layers", "num_layers")
    blocks_name, block_list = _find_blocks(model, num_layers)

    blocks = []
    for index, block in enumerate(block_list):
        linears, unmapped = [], []
        for path, module in block.named_modules():
            if not is_linear(module):
                continue
            role_group = _role_of(path)
            if role_group is None:
                unmapped.append(path)
                continue
            role, group = role_group
            full = f"{blocks_name}.{index}.{path}"
            linears.append(LinearInfo(path, full, role, group, module))
        blocks.append(BlockInfo(index, f"{blocks_name}.{index}", block, linears, unmapped))

    first = blocks[0]
    missing = []
    if not any(lin.group == "attention" for lin in first.linears):
        missing.append("attention projections (q/k/v/o or a fused qkv)")
    if not any(lin.group == "mlp" for lin in first.linears):
        missing.append("MLP linears (up/gate/down, fc1/fc2, ...)")
    if missing:
        found = [path for path, m in first.module.named_modules() if is_linear(m)]
        raise UnsupportedArchitectureError(
            f"{type(model).__name__}: could not find {' and '.join(missing)} in {blocks_name}.0; "
            f"linears found there: {found}. Add their names to workbench.arch.ROLE_BY_NAME."
        )

    hidden = _config_value(config, "hidden_size", "n_embd", "d_model")
    num_heads = _config_value(config, "num_attention_heads", "n_head", "n_heads", "num_heads")
    if hidden is None or num_heads is None:
        raise UnsupportedArchitectureError(
            f"{type(model).__name__}: config has no hidden size or head count "
            "(looked for hidden_size/n_embd/d_model and num_attention_heads/n_head/n_heads)."
        )
    head_dim = _config_value(config, "head_dim") or hidden // num_heads
    up = first.by_role("up")
    intermediate = in_out_features(up[0].module)[1] if up else None

    embeddings = [n for n, m in model.named_modules() if isinstance(m, nn.Embedding)]
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head_name = next((n for n, m in model.named_modules() if m is output), None) if output else None
    return ModelLayout(
        family=getattr(config, "model_type", type(model).__name__),
        blocks_name=blocks_name,
        blocks=blocks,
        hidden_size=int(hidden),
        intermediate_size=intermediate,
        num_heads=int(num_heads),
        num_kv_heads=_num_kv_heads(config, int(num_heads)),
        head_dim=int(head_dim),
        embedding_names=embeddings,
        head_name=head_name,
    )


def left_dense(layout: ModelLayout) -> list[tuple[str, str]]:
    """(full name, reason) for every linear inside the decoder blocks that no method will prune,
    whatever the scope, so that nothing the user asked for is left dense without a word."""
    skipped = []
    for block in layout.blocks:
        for path in block.unmapped:
            module = block.module.get_submodule(path)
            shape = "x".join(str(n) for n in in_out_features(module)[::-1])
            skipped.append((f"{block.name}.{path}", f"a {shape} linear whose name is not in "
                            "workbench.arch.ROLE_BY_NAME, so whether it belongs to attention or "
                            "the MLP is unknown (a router or an extra projection?); add its name "
                            "there to prune it"))
    return skipped
