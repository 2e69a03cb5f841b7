"""One matrix product for several projections of the same input.

A self-attention module holds its query, key and value projections as one
nn.Linear, ``qkv_proj``, whose outputs are q, k and v side by side (FLASH's
gated attention unit likewise its U, V and Z projections, ``to_uvz``): one
kernel instead of three, at every training pass and decoding step. A state
dict that holds the parts apart (``q_proj``, ``k_proj``, ``v_proj``: a
softmax attention's, or a checkpoint saved that way) loads into the stacked
one through fairseq's ``upgrade_state_dict_named``.
"""
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
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


def project_parts(linear: nn.Linear, x: Tensor, widths: Sequence[int], first: int, count: int) -> Tuple[Tensor, ...]:
    """Parts first .. first + count - 1 of x's projection by a stacked nn.Linear whose
    parts are `widths` wide: one matrix product of their rows (of the whole weight
    where every part is asked for, so its gradient is not written into zeros)."""
    if count == len(widths):
        return linear(x).split(list(widths), dim=-1)
    start, parts = sum(widths[:first]), list(widths[first:first + count])
    rows = slice(start, start + sum(parts))
    return F.linear(x, linear.weight[rows], linear.bias[rows]).split(parts, dim=-1)


def stack_apart(tensors: dict, name: str, parts=QKV, fused: str = "qkv_proj") -> Optional[Tensor]:
    """For `name` = MODULE.<fused>.KIND: the tensors MODULE.<part>.KIND of `tensors`
    stacked as <fused> holds them; None where one is missing."""
    module, found, kind = name.rpartition(f".{fused}.")
    names = [f"{module}.{part}.{kind}" for part in parts]
    if not found or not all(part in tensors for part in names):
        return None
    return torch.cat([tensors[part] for part in names])


def load_apart(state_dict: dict, name: str, parts=QKV, fused: str = "qkv_proj") -> None:
    """In `state_dict`, the module `name`'s `parts` tensors, where it holds them
    apart and not `fused`, replaced by `fused`'s."""
    for kind in ("weight", "bias"):
        stacked_name = f"{name}.{fused}.{kind}"
        tensor = stack_apart(state_dict, stacked_name, parts, fused)
        if tensor is not None and stacked_name not in state_dict:
            state_dict[stacked_name] = tensor
            for part in parts:
                del state_dict[f"{name}.{part}.{kind}"]
