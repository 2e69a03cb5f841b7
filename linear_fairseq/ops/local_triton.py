"""The sliding window's decoding step as one Triton kernel.

The function of ``local.window_step`` (same arguments, same state), for
decoding only (no autograd: the ring is written in place). Per batch row and
head, one program writes the step's key and value into the ring's slot, reads
the ring in blocks of BLOCK_W slots with a running maximum and sum (the
softmax over the ring, as a fused attention reads its keys), scales the result
by the head's weight where one is given, and, in the program of head 0, marks
the slot real or padded and writes where the next step writes: the torch
step's index copies, attention, scaling and slot arithmetic in one launch. On
CUDA it runs compiled; elsewhere only through Triton's interpreter
(TRITON_INTERPRET=1, which the tests use).
"""
import math
from typing import Dict, Optional, Tuple

import triton
import triton.language as tl
from torch import Tensor

from .common import strides
from .local import empty_window_state

BLOCK_W = 64  # ring slots a program reads at a time


@triton.jit
def _ring_block(ring, new, rows, cols, slot, W, d, s_w, s_d):
    """Slots `rows` of one row and head of the ring (float32), the slot being
    written holding `new` (a program reads what it writes from its registers)."""
    inside = (rows[:, None] < W) & (cols[None, :] < d)
    block = tl.load(ring + rows[:, None] * s_w + cols[None, :] * s_d, mask=inside, other=0.0).to(tl.float32)
    return tl.where(rows[:, None] == slot, new[None, :], block)


@triton.jit
def _window_step_kernel(
    q, k, v, K, V, bias, slot, next_slot, out, head_weight, padding_mask,
    H, W, d, scale,
    sq_b, sq_h, sq_d, sk_b, sk_h, sk_d, sv_b, sv_h, sv_d, sK_b, sK_h, sK_w, sK_d, sV_b, sV_h, sV_w, sV_d,
    sb_b, sb_w, so_b, so_h, so_d, spm_b,
    HAS_MASK: tl.constexpr, HAS_WEIGHT: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0) // H
    h = tl.program_id(0) % H
    cols = tl.arange(0, BLOCK_D)
    s = tl.load(slot)  # the same in every row
    key = tl.load(k + b * sk_b + h * sk_h + cols * sk_d, mask=cols < d, other=0.0)
    value = tl.load(v + b * sv_b + h * sv_h + cols * sv_d, mask=cols < d, other=0.0)
    K_row = K + b * sK_b + h * sK_h
    V_row = V + b * sV_b + h * sV_h
    tl.store(K_row + s * sK_w + cols * sK_d, key.to(K.dtype.element_ty), mask=cols < d)
    tl.store(V_row + s * sV_w + cols * sV_d, value.to(V.dtype.element_ty), mask=cols < d)
    key = key.to(K.dtype.element_ty).to(tl.float32)  # as the ring holds it
    value = value.to(V.dtype.element_ty).to(tl.float32)
    new_bias = 0.0
    if HAS_MASK:
        new_bias = tl.where(tl.load(padding_mask + b * spm_b) != 0, -float("inf"), 0.0)
    tl.store(bias + b * sb_b + s * sb_w, new_bias, mask=h == 0)
    tl.store(next_slot + b, (s + 1) % W, mask=h == 0)

    query = tl.load(q + b * sq_b + h * sq_h + cols * sq_d, mask=cols < d, other=0.0).to(tl.float32) * scale
    top = -float("inf")  # the running maximum of the scores, the sum of their exponentials, the weighted values
    total = 0.0
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for w0 in range(0, W, BLOCK_W):
        rows = w0 + tl.arange(0, BLOCK_W)
        keys = _ring_block(K_row, key, rows, cols, s, W, d, sK_w, sK_d)
        slot_bias = tl.load(bias + b * sb_b + rows * sb_w, mask=rows < W, other=-float("inf")).to(tl.float32)
        slot_bias = tl.where(rows == s, new_bias, slot_bias)
        scores = tl.where(rows < W, tl.sum(keys * query[None, :], axis=1) + slot_bias, -float("inf"))
        new_top = tl.maximum(top, tl.max(scores, axis=0))
        shift = tl.where(new_top == -float("inf"), 0.0, new_top)  # no real key yet: every weight 0
        p = tl.exp(scores - shift)
        rescale = tl.exp(top - shift)
        values = _ring_block(V_row, value, rows, cols, s, W, d, sV_w, sV_d)
        acc = acc * rescale + tl.sum(p[:, None] * values, axis=0)
        total = total * rescale + tl.sum(p, axis=0)
        top = new_top
    result = tl.where(total > 0.0, acc / tl.where(total > 0.0, total, 1.0), 0.0)  # no real key: zeros
    if HAS_WEIGHT:
        result = result * tl.load(head_weight + h).to(tl.float32)
    tl.store(out + b * so_b + h * so_h + cols * so_d, result.to(out.dtype.element_ty), mask=cols < d)


def window_step(q: Tensor, k: Tensor, v: Tensor, state: Optional[Dict[str, Tensor]], W: int,
                padding_mask: Optional[Tensor] = None, head_weight: Optional[Tensor] = None
                ) -> Tuple[Tensor, Dict[str, Tensor]]:
    """``local.window_step`` (the same arguments, any strides) in one kernel, the ring
    written in place; out (B, H, d) in q's dtype, times `head_weight` (H,) per head
    where it is given."""
    B, H, d = q.shape
    state = state if state is not None else empty_window_state(q, k, v, W)
    K, V, bias, slot = (state[name] for name in ("k", "v", "bias", "slot"))
    out, next_slot = q.new_empty(B, H, d), slot.new_empty(B)
    _window_step_kernel[(B * H,)](
        q, k, v, K, V, bias, slot, next_slot, out, head_weight, padding_mask,
        H, W, d, 1.0 / math.sqrt(d),
        *q.stride(), *k.stride(), *v.stride(), *K.stride(), *V.stride(), bias.stride(0), bias.stride(3),
        *out.stride(), *strides(padding_mask, 1),
        HAS_MASK=padding_mask is not None, HAS_WEIGHT=head_weight is not None,
        BLOCK_W=min(BLOCK_W, triton.next_power_of_2(W)), BLOCK_D=triton.next_power_of_2(d),
    )
    return out, {"k": K, "v": V, "bias": bias, "slot": next_slot}
