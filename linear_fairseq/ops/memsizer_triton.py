"""MemSizer's decoding step as one Triton kernel.

From the step's three projections (x Phi_h^T, x W_l, x W_r) to its output: the
key and value norms K = LN(x W_l), V = LN(x W_r), the slot weights p = mean_h
softmax(x Phi_h^T), the memory S += k v^T and count n += 1 (a padded step
leaves both), and out = p S / sqrt(n): the function of the module's norms,
``memsizer.slot_probs`` and ``memsizer.causal_step`` (same state), for decoding
only (no autograd: S is updated in place). One program per batch row and
block of value columns; each computes the norms' statistics over the whole
row and the slot weights itself, and the program of the first block writes
the new count. On CUDA it runs compiled; elsewhere only through Triton's
interpreter (TRITON_INTERPRET=1, which the tests use).
"""
from typing import Optional, Tuple

import triton
import triton.language as tl
from torch import Tensor, nn

from .common import State, strides
from .memsizer import empty_state
from .triton_common import on_its_device


@triton.jit
def _moments(x, inside, n, eps):
    """The mean and 1 / sqrt(variance + eps) of the n entries of x where `inside`."""
    mean = tl.sum(tl.where(inside, x, 0.0), axis=0) / n
    centred = tl.where(inside, x - mean, 0.0)
    return mean, tl.rsqrt(tl.sum(centred * centred, axis=0) / n + eps)


@triton.jit
def _normed(x, mean, rstd, weight, bias, at, inside, dtype):
    """LN's output at entries `at` of a row with those moments, rounded to `dtype` (as the norm
    writes it), float32; zero outside."""
    w = tl.load(weight + at, mask=inside, other=0.0).to(tl.float32)
    b = tl.load(bias + at, mask=inside, other=0.0).to(tl.float32)
    return ((x - mean) * rstd * w + b).to(dtype).to(tl.float32)


@triton.jit
def _step_kernel(
    logits, k_pre, v_pre, k_weight, k_bias, v_weight, v_bias, S, n, next_n, out, padding_mask,
    H, k, d, k_eps, v_eps,
    sl_b, sl_h, sl_k, skp_b, skp_k, svp_b, svp_d, sS_b, sS_k, sS_d, so_b, so_d, spm_b,
    HAS_MASK: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_ROW: tl.constexpr,
):
    b = tl.program_id(0)
    slots = tl.arange(0, BLOCK_K)
    in_k = slots < k
    # p: each head's softmax over the slots, averaged
    p = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for h in range(0, H):
        z = tl.load(logits + b * sl_b + h * sl_h + slots * sl_k, mask=in_k, other=-float("inf")).to(tl.float32)
        e = tl.exp(z - tl.max(z, axis=0))
        p += e / tl.sum(e, axis=0)
    p = p / H
    # K = LN(x W_l), V = LN(x W_r) (V's moments over the whole row, its values at this block's columns)
    kp = tl.load(k_pre + b * skp_b + slots * skp_k, mask=in_k, other=0.0).to(tl.float32)
    k_mean, k_rstd = _moments(kp, in_k, k, k_eps)
    key = _normed(kp, k_mean, k_rstd, k_weight, k_bias, slots, in_k, out.dtype.element_ty)
    row = tl.arange(0, BLOCK_ROW)
    v_mean, v_rstd = _moments(tl.load(v_pre + b * svp_b + row * svp_d, mask=row < d, other=0.0).to(tl.float32),
                              row < d, d, v_eps)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    in_d = cols < d
    vp = tl.load(v_pre + b * svp_b + cols * svp_d, mask=in_d, other=0.0).to(tl.float32)
    value = _normed(vp, v_mean, v_rstd, v_weight, v_bias, cols, in_d, out.dtype.element_ty)
    # S += k v^T and n += 1 for a real token; out = p S / sqrt(n)
    real = 1.0
    if HAS_MASK:
        real = tl.where(tl.load(padding_mask + b * spm_b) != 0, 0.0, 1.0)
    count = tl.load(n + b) + real
    tl.store(next_n + b, count, mask=tl.program_id(1) == 0)
    at = S + b * sS_b + slots[:, None] * sS_k + cols[None, :] * sS_d
    inside = in_k[:, None] & in_d[None, :]
    memory = tl.load(at, mask=inside, other=0.0) + real * key[:, None] * value[None, :]
    tl.store(at, memory, mask=inside)
    result = tl.sum(p[:, None] * memory, axis=0) * tl.rsqrt(tl.maximum(count, 1.0))
    tl.store(out + b * so_b + cols * so_d, result.to(out.dtype.element_ty), mask=in_d)


@on_its_device
def causal_step(logits: Tensor, k_pre: Tensor, v_pre: Tensor, k_norm: nn.LayerNorm, v_norm: nn.LayerNorm,
                state: Optional[State] = None, padding_mask: Optional[Tensor] = None) -> Tuple[Tensor, State]:
    """One step from the projections: logits (B, H, k) = x Phi_h^T, k_pre (B, k) = x W_l,
    v_pre (B, d) = x W_r, any strides; the norms LN (their weight, bias, eps); state
    {S, n} as ``memsizer.causal_step`` keeps it (None: empty), S updated in place.
    Returns out (B, d) in v_pre's dtype and the state."""
    B, H, k = logits.shape
    d = v_pre.shape[-1]
    state = state if state is not None else empty_state(B, k, d, v_pre)
    S, n = state["S"], state["n"]
    out, next_n = v_pre.new_empty(B, d), n.new_empty(B)
    BLOCK_K = triton.next_power_of_2(k)
    BLOCK_D = min(triton.next_power_of_2(d), max(16, 4096 // BLOCK_K))  # a block of S: at most 4096 entries
    _step_kernel[(B, triton.cdiv(d, BLOCK_D))](
        logits, k_pre, v_pre, k_norm.weight, k_norm.bias, v_norm.weight, v_norm.bias, S, n, next_n, out,
        padding_mask,
        H, k, d, k_norm.eps, v_norm.eps,
        *logits.stride(), *k_pre.stride(), *v_pre.stride(), *S.stride(), *out.stride(), *strides(padding_mask, 1),
        HAS_MASK=padding_mask is not None, BLOCK_K=BLOCK_K, BLOCK_D=BLOCK_D, BLOCK_ROW=triton.next_power_of_2(d),
    )
    return out, {"S": S, "n": next_n}
