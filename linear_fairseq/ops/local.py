"""Local precision beside a linear attention (torch only): a short depthwise
convolution over time, and exact softmax attention over a sliding window.

Both keep a decoding state bounded by their width: the last K-1 inputs of the
convolution, the last W keys and values of the window.

Convolution (width K, weight (C, K)): causal, y_t = sum_i w[:, i] x_{t-K+1+i};
non-causal, the same window centred on t (K//2 positions after it). Padded
inputs count as zero.

Window (width W): causal, query i attends to keys j with i - W < j <= i;
non-causal, to keys with |i - j| <= W // 2. Padded keys are never attended to.
The parallel forms work on blocks of W queries (a block sees itself and its
neighbours), so their operator count does not grow with T and their memory is
O(T W), not O(T^2).
"""
import math
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .common import acc, acc_dtype, constant, own_precision, update, writable, zero_padded


# -- short convolution -------------------------------------------------------------------
@own_precision
def conv(x: Tensor, weight: Tensor, causal: bool, padding_mask: Optional[Tensor] = None) -> Tensor:
    """x (B, T, C), weight (C, K) -> (B, T, C)."""
    C, K = weight.shape
    x = zero_padded(x, padding_mask, 1).transpose(1, 2)
    left = K - 1 if causal else (K - 1) // 2
    x = F.pad(x, (left, K - 1 - left))
    return F.conv1d(x, weight.unsqueeze(1).to(x.dtype), groups=C).transpose(1, 2).contiguous()


@own_precision
def conv_step(x: Tensor, weight: Tensor, state: Optional[Tensor], padding_mask: Optional[Tensor] = None
              ) -> Tuple[Tensor, Tensor]:
    """One causal step: x (B, C), state (B, K-1, C) the previous inputs (None:
    zeros) -> (y (B, C), next state)."""
    C, K = weight.shape
    if padding_mask is not None:
        x = x.masked_fill(padding_mask.unsqueeze(-1), 0.0)
    if state is None:
        state = x.new_zeros(x.shape[0], K - 1, C)
    window = torch.cat([state, x.unsqueeze(1)], dim=1)  # (B, K, C), oldest first
    return torch.einsum("bkc,ck->bc", window, weight.to(x.dtype)), window[:, 1:]


def conv_naive(x: Tensor, weight: Tensor, causal: bool, padding_mask: Optional[Tensor] = None) -> Tensor:
    """The definition, position by position (tests)."""
    B, T, C = x.shape
    K = weight.shape[1]
    x = zero_padded(x, padding_mask, 1)
    left = K - 1 if causal else (K - 1) // 2
    out = torch.zeros_like(x)
    for t in range(T):
        for i in range(K):
            s = t - left + i
            if 0 <= s < T:
                out[:, t] += weight[:, i] * x[:, s]
    return out


# -- sliding-window softmax attention -------------------------------------------------------
def in_window(offset: Tensor, W: int, causal: bool) -> Tensor:
    """Whether a key `offset` = query - key positions before its query is in the query's window."""
    return (offset >= 0) & (offset < W) if causal else offset.abs() <= W // 2


def window_mask(T: int, W: int, causal: bool, device=None) -> Tensor:
    """(T, T) bool, True where query i may attend to key j."""
    i = torch.arange(T, device=device)
    return in_window(i[:, None] - i[None, :], W, causal)


@own_precision
def window_naive(q: Tensor, k: Tensor, v: Tensor, W: int, causal: bool,
                 padding_mask: Optional[Tensor] = None) -> Tensor:
    """q, k, v (B, H, T, d) -> (B, H, T, d), the whole T x T score matrix (tests)."""
    T = q.shape[2]
    scores = acc(q) @ acc(k).transpose(-1, -2) / math.sqrt(q.shape[-1])
    allowed = window_mask(T, W, causal, q.device)
    if padding_mask is not None:
        allowed = allowed & ~padding_mask[:, None, None, :]
    weights = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1).nan_to_num(0.0)
    return (weights @ acc(v)).to(v.dtype)


def block_layout(W: int, causal: bool) -> Tuple[int, Tuple[int, int]]:
    """`window`'s blocks: (n, the neighbouring blocks before and after a block's own)."""
    return (W, (1, 0)) if causal else (W // 2 + 1, (1, 1))


@own_precision
def window(q: Tensor, k: Tensor, v: Tensor, W: int, causal: bool, padding_mask: Optional[Tensor] = None) -> Tensor:
    """q, k, v (B, H, T, d) -> (B, H, T, d), block by block: queries in blocks of
    n = W (causal: a block's keys are its own and the block before) or n = W//2 + 1
    (non-causal: the blocks before and after too)."""
    B, H, T, d = q.shape
    n, span = block_layout(W, causal)
    blocks = -(-T // n)
    pad = blocks * n - T
    q, k, v = ((F.pad(t, (0, 0, 0, pad)) if pad else t).unflatten(2, (blocks, n)) for t in (q, k, v))
    keys, values = neighbours(k, span, 2), neighbours(v, span, 2)
    m = keys.shape[3]
    hidden = window_hidden(T, W, causal, q.device)  # (blocks, n, m)
    if padding_mask is not None:  # padded keys too: (B, 1, blocks, n, m)
        padded = neighbours(F.pad(padding_mask, (0, pad)).unflatten(1, (blocks, n)), span, 1)
        hidden = hidden | padded[:, None, :, None, :]
    # batched matrix products over (B H blocks), on 3-d tensors; masked_fill's backward also
    # zeroes the gradient of a row with nothing to see (softmax gives nan there)
    scores = torch.baddbmm(q.new_empty(1, 1, 1, dtype=acc_dtype(q)), acc(q).reshape(-1, n, d),
                           acc(keys).reshape(-1, m, d).transpose(1, 2), beta=0.0, alpha=1.0 / math.sqrt(d))
    scores = scores.view(B, H, blocks, n, m).masked_fill(hidden, float("-inf"))
    weights = torch.softmax(scores, dim=-1)
    if padding_mask is not None:  # a query whose window holds only padding reads zeros
        weights = weights.nan_to_num(0.0)
    out = (weights.view(-1, n, m) @ acc(values).reshape(-1, m, d)).view(B, H, blocks * n, d)[:, :, :T]
    return out.to(v.dtype)


@constant(maxsize=8)
def window_hidden(T: int, W: int, causal: bool, device: torch.device) -> Tensor:
    """(blocks, n, m) bool: True where a query of `window`'s blocks may not attend
    to a key of its block's neighbourhood (outside its window or outside the
    sequence). A query past the end, which only fills the last block, sees
    itself, so no row is empty."""
    n, (before, after) = block_layout(W, causal)
    blocks = -(-T // n)
    query = torch.arange(blocks * n, device=device).view(blocks, n, 1)
    key = query[:, :1] + torch.arange(-before * n, (1 + after) * n, device=device)  # (blocks, 1, m)
    offset = query - key
    return ~(in_window(offset, W, causal) & (((key >= 0) & (key < T)) | (offset == 0)))


def neighbours(x: Tensor, span: Tuple[int, int], dim: int) -> Tensor:
    """Each block of x (blocks at `dim`, positions at dim + 1) joined, along the
    positions, with the `span[0]` blocks before it and `span[1]` after it
    (zeros, or False, past the ends): the windows of one padded copy of x,
    overlapping views of it (a product that reads them contiguously copies them)."""
    before, after = span
    n, trailing = x.shape[dim + 1], x.dim() - dim - 2
    padded = F.pad(x.flatten(dim, dim + 1), [0, 0] * trailing + [before * n, after * n])
    return padded.unfold(dim, (before + 1 + after) * n, n).movedim(-1, dim + 1)


WINDOW_STATE = ("k", "v", "bias", "slot")  # the entries of window_step's state


def empty_window_state(q: Tensor, k: Tensor, v: Tensor, W: int) -> Dict[str, Tensor]:
    """window_step's state before the first step, for a step's q, k, v (B, H, d): W
    empty slots, the first one written next."""
    B, H, d = q.shape
    return {"k": k.new_zeros(B, H, W, d), "v": v.new_zeros(B, H, W, d),
            "bias": q.new_full((B, 1, 1, W), float("-inf")),
            "slot": torch.zeros(B, dtype=torch.long, device=q.device)}


@own_precision
def window_step(q: Tensor, k: Tensor, v: Tensor, state: Optional[Dict[str, Tensor]], W: int,
                padding_mask: Optional[Tensor] = None) -> Tuple[Tensor, Dict[str, Tensor]]:
    """One causal step: q, k, v (B, H, d). The state is a ring of W slots: "k",
    "v" (B, H, W, d), "bias" (B, 1, 1, W) 0 where a slot holds a real key and -inf
    where it is empty or padded, "slot" (B,) where this step writes (the same in
    every row). Softmax ignores the order of its keys, so the step writes one
    slot (in place without autograd, as a KV cache is written) and runs one
    fused attention (torch's scaled_dot_product_attention) over the ring; a
    query with no real key (padding from the start) reads zeros."""
    B, H, d = q.shape
    state = state if state is not None else empty_window_state(q, k, v, W)
    slot, in_place = state["slot"][:1], writable(k, v, state["k"], state["v"])
    keys, values = (update(state[name], "index_copy", in_place, 2, slot, x.unsqueeze(2))
                    for name, x in (("k", k), ("v", v)))
    if padding_mask is None:
        bias = update(state["bias"], "index_fill", in_place, 3, slot, 0.0)
    else:
        padded = q.new_zeros(B, 1, 1, 1).masked_fill(padding_mask.view(B, 1, 1, 1), float("-inf"))
        bias = update(state["bias"], "index_copy", in_place, 3, slot, padded)
    out = F.scaled_dot_product_attention(q.unsqueeze(2), keys, values, attn_mask=bias).squeeze(2)
    if padding_mask is not None:
        out = out.nan_to_num(0.0)
    return out, {"k": keys, "v": values, "bias": bias, "slot": (state["slot"] + 1) % W}
