"""A toy family's math (docs/development.md's example): a decayed running mean
of values, out_i = sum_j<=i w^(i-j) v_j / sum_j<=i w^(i-j) over real positions."""
from typing import Dict, Optional, Tuple

import torch
from torch import Tensor


def naive(v: Tensor, real: Tensor, decay: float) -> Tensor:
    """v (B, T, C), real (B, T) bool: the causal form, quadratic, as the definition reads."""
    T = v.shape[1]
    i = torch.arange(T)
    w = torch.where(i[:, None] >= i[None, :], decay ** (i[:, None] - i[None, :]).clamp(min=0).to(v.dtype), 0.0)
    w = w * real[:, None, :].to(v.dtype)  # (B, T, T)
    return (w @ v) / w.sum(-1, keepdim=True).clamp(min=1e-9)


def summarize(v: Tensor, real: Tensor) -> Dict[str, Tensor]:
    """The non-causal state: the mean over real positions, as (sum, count)."""
    r = real.to(v.dtype).unsqueeze(-1)
    return {"sum": (v * r).sum(1), "n": r.sum(1)}


def read(state: Dict[str, Tensor]) -> Tensor:
    return state["sum"] / state["n"].clamp(min=1e-9)


def step(v: Tensor, real: Tensor, state: Optional[Dict[str, Tensor]], decay: float) -> Tuple[Tensor, dict]:
    """One position: v (B, C), real (B,) bool."""
    r = real.to(v.dtype).unsqueeze(-1)  # a padded position adds nothing
    total = v * r + (decay * state["sum"] if state else 0)
    n = r + (decay * state["n"] if state else 0)
    state = {"sum": total, "n": n}
    return read(state), state
