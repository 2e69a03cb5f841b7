"""One matrix product for an attention's query, key and value projections.

A self-attention module holds them as one nn.Linear, ``qkv_proj``, whose
outputs are q, k and v side by side: one kernel instead of three, at every
training pass and decoding step. A state dict that holds them apart
(``q_proj``, ``k_proj``, ``v_proj``: a softmax attention's, or a checkpoint
saved that way) loads into it through fairseq's ``upgrade_state_dict_named``.
"""
from typing import Optional

import torch
from torch import Tensor, nn

QKV = ("q_proj", "k_proj", "v_proj")


def stacked(*projections: nn.Linear) -> nn.Linear:
    """One nn.Linear whose outputs are the projections' outputs side by side."""
    weight = projections[0].weight
    out = nn.utils.skip_init(nn.Linear, weight.shape[1], sum(p.out_features for p in projections),
                             device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        out.weight.copy_(torch.cat([p.weight for p in projections]))
        out.bias.copy_(torch.cat([p.bias for p in projections]))
    return out


def stack_qkv(tensors: dict, name: str) -> Optional[Tensor]:
    """For `name` = MODULE.qkv_proj.KIND: the tensors MODULE.{q,k,v}_proj.KIND of
    `tensors` stacked as qkv_proj holds them; None where one is missing."""
    module, fused, kind = name.rpartition(".qkv_proj.")
    parts = [f"{module}.{proj}.{kind}" for proj in QKV]
    if not fused or not all(part in tensors for part in parts):
        return None
    return torch.cat([tensors[part] for part in parts])


def load_apart(state_dict: dict, name: str) -> None:
    """In `state_dict`, the module `name`'s q_proj, k_proj and v_proj tensors,
    where it holds them apart and no qkv_proj, replaced by qkv_proj's."""
    for kind in ("weight", "bias"):
        fused = f"{name}.qkv_proj.{kind}"
        parts = stack_qkv(state_dict, fused)
        if parts is not None and fused not in state_dict:
            state_dict[fused] = parts
            for proj in QKV:
                del state_dict[f"{name}.{proj}.{kind}"]
