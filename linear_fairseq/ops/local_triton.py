"""The sliding window on Triton kernels: its training form and its decoding step.

``window`` is ``local.window`` (causal or not, padded keys never attended to)
on q, k, v given as one projection (B, T, 3, H, d), with autograd: one forward
kernel, a program per block of BLOCK queries of a row and head reading only
the key blocks its window reaches, with a running maximum and sum (the
softmax as a fused attention computes it), keeping each query's
log-sum-exp; and one backward kernel launched twice, which recomputes the
weights from the log-sum-exp: per block of queries (dQ, and D = rowsum(dO O),
kept), then per block of keys (dK, dV, from the query blocks that reach it,
with the weights laid out keys by queries so no product takes a transposed
tile). The gradient of q, k and v is written as one tensor of the
projection's shape. Work and memory are O(T W d).

``window_step`` is the function of ``local.window_step`` (same arguments, same
state), for decoding only (no autograd: the ring is written in place). Per batch row and
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

import torch
import triton
import triton.language as tl
from torch import Tensor

from .common import strides
from .local import empty_window_state
from .triton_common import OPERANDS, _dot, capability, on_its_device

BLOCK_W = 64  # ring slots a program reads at a time (decoding)
BLOCK = 32  # queries, or keys, a training program takes at a time


# -- training ----------------------------------------------------------------------------
@triton.jit
def _reach(W, CAUSAL: tl.constexpr):
    """How far a query's window reaches (before, after) it."""
    if CAUSAL:
        return W - 1, 0
    return W // 2, W // 2


@triton.jit
def _seen(i, j, T, W, padding_mask, spm_b, spm_t, b, HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr):
    """Whether queries i attend to keys j (positions, broadcast against each other): in the
    query's window, inside the sequence, not padding."""
    before, after = _reach(W, CAUSAL)
    ok = (i - j <= before) & (j - i <= after) & (j >= 0) & (j < T)
    if HAS_MASK:
        ok = ok & (tl.load(padding_mask + b * spm_b + j * spm_t, mask=(j >= 0) & (j < T), other=1) == 0)
    return ok


@triton.jit
def _tile(x, rows, dims, T, d, s_t, s_d):
    """rows (positions) by dims of one row and head of x (strides s_t, s_d), zeros outside."""
    return tl.load(x + rows[:, None] * s_t + dims[None, :] * s_d, mask=(rows[:, None] < T) & (dims[None, :] < d),
                   other=0.0)


@triton.jit
def _tile_t(x, rows, dims, T, d, s_t, s_d):
    """_tile transposed: dims by rows (positions), float32."""
    return tl.load(x + rows[None, :] * s_t + dims[:, None] * s_d, mask=(rows[None, :] < T) & (dims[:, None] < d),
                   other=0.0).to(tl.float32)


@triton.jit
def _keys_values(at, cols, dims, T, d, s_t, s_p, s_d):
    """k and v (float32) of keys `cols` of one row and head (`at`) of the projection."""
    return (_tile(at + s_p, cols, dims, T, d, s_t, s_d).to(tl.float32),
            _tile(at + 2 * s_p, cols, dims, T, d, s_t, s_d).to(tl.float32))


@triton.jit
def _query_rows(qkv, grad_out, lse, rows, dims, b, h, T, H, d, s_t, s_d, sg_t, sg_d):
    """A block of queries: q, dO (float32) and their log-sum-exp."""
    q = _tile(qkv, rows, dims, T, d, s_t, s_d).to(tl.float32)
    do = _tile(grad_out, rows, dims, T, d, sg_t, sg_d).to(tl.float32)
    return q, do, tl.load(lse + (b * H + h) * T + rows, mask=rows < T, other=float("inf"))


@triton.jit
def _program(H, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr):
    """This program's first position, batch row, head, its BLOCK positions and the head's dims."""
    first = tl.program_id(0) * BLOCK
    return (first, tl.program_id(1) // H, tl.program_id(1) % H, first + tl.arange(0, BLOCK),
            tl.arange(0, BLOCK_D))


@triton.jit
def _forward_kernel(
    qkv, out, lse, padding_mask, T, H, W, d, scale,
    s_b, s_t, s_p, s_h, s_d, so_b, so_t, so_h, so_d, spm_b, spm_t,
    HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr, OP: tl.constexpr, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr,
):
    i0, b, h, rows, dims = _program(H, BLOCK, BLOCK_D)
    at = qkv + b * s_b + h * s_h
    q = _tile(at, rows, dims, T, d, s_t, s_d).to(tl.float32)
    before, after = _reach(W, CAUSAL)
    top = tl.full((BLOCK,), -float("inf"), tl.float32)
    total = tl.zeros((BLOCK,), dtype=tl.float32)
    acc = tl.zeros((BLOCK, BLOCK_D), dtype=tl.float32)
    for j0 in range(tl.maximum(i0 - before, 0), tl.minimum(i0 + BLOCK + after, T), BLOCK):
        cols = j0 + tl.arange(0, BLOCK)
        k, v = _keys_values(at, cols, dims, T, d, s_t, s_p, s_d)
        scores = _dot(q, tl.trans(k), OP) * scale
        scores = tl.where(_seen(rows[:, None], cols[None, :], T, W, padding_mask, spm_b, spm_t, b, HAS_MASK, CAUSAL),
                          scores, -float("inf"))
        new_top = tl.maximum(top, tl.max(scores, axis=1))
        shift = tl.where(new_top == -float("inf"), 0.0, new_top)  # nothing seen yet: every weight 0
        p = tl.exp(scores - shift[:, None])
        rescale = tl.exp(top - shift)
        total = total * rescale + tl.sum(p, axis=1)
        acc = acc * rescale[:, None] + _dot(p, v, OP)
        top = new_top
    seen = total > 0.0  # a query whose window holds only padding reads zeros
    result = tl.where(seen[:, None], acc / tl.where(seen, total, 1.0)[:, None], 0.0)
    tl.store(out + b * so_b + h * so_h + rows[:, None] * so_t + dims[None, :] * so_d,
             result.to(out.dtype.element_ty), mask=(rows[:, None] < T) & (dims[None, :] < d))
    tl.store(lse + (b * H + h) * T + rows, tl.where(seen, top + tl.log(tl.where(seen, total, 1.0)), float("inf")),
             mask=rows < T)


@triton.jit
def _backward_kernel(
    qkv, out, grad_out, lse, delta, grad, padding_mask, T, H, W, d, scale,
    s_b, s_t, s_p, s_h, s_d, so_b, so_t, so_h, so_d, sg_b, sg_t, sg_h, sg_d,
    sd_b, sd_t, sd_p, sd_h, sd_d, spm_b, spm_t,
    HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr, OP: tl.constexpr, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr,
    KEYS: tl.constexpr,
):
    """KEYS: dK and dV of a block of keys, from the query blocks whose windows reach it;
    else dQ of a block of queries, from the key blocks their windows reach, and the
    queries' D = rowsum(dO * O) (`delta`), which the keys' programs read: they run after."""
    n0, b, h, own, dims = _program(H, BLOCK, BLOCK_D)
    at = qkv + b * s_b + h * s_h
    out += b * so_b + h * so_h
    grad_out += b * sg_b + h * sg_h
    grad += b * sd_b + h * sd_h + own[:, None] * sd_t + dims[None, :] * sd_d
    inside = (own[:, None] < T) & (dims[None, :] < d)
    before, after = _reach(W, CAUSAL)
    if KEYS:
        k, v = _keys_values(at, own, dims, T, d, s_t, s_p, s_d)
        dk = tl.zeros((BLOCK, BLOCK_D), dtype=tl.float32)
        dv = tl.zeros((BLOCK, BLOCK_D), dtype=tl.float32)
        for i0 in range(tl.maximum(n0 - after, 0), tl.minimum(n0 + BLOCK + before, T), BLOCK):
            rows = i0 + tl.arange(0, BLOCK)
            q, do, m = _query_rows(at, grad_out, lse, rows, dims, b, h, T, H, d, s_t, s_d, sg_t, sg_d)
            D = tl.load(delta + (b * H + h) * T + rows, mask=rows < T, other=0.0)
            # the weights and their gradient transposed, keys by queries: no transposed tile in a product
            seen = _seen(rows[None, :], own[:, None], T, W, padding_mask, spm_b, spm_t, b, HAS_MASK, CAUSAL)
            pT = tl.where(seen, tl.exp(_dot(k, _tile_t(at, rows, dims, T, d, s_t, s_d), OP) * scale - m[None, :]),
                          0.0)
            dv += _dot(pT, do, OP)
            dk += _dot(pT * (_dot(v, _tile_t(grad_out, rows, dims, T, d, sg_t, sg_d), OP) - D[None, :]), q, OP)
        tl.store(grad + sd_p, (dk * scale).to(grad.dtype.element_ty), mask=inside)
        tl.store(grad + 2 * sd_p, dv.to(grad.dtype.element_ty), mask=inside)
    else:
        q, do, m = _query_rows(at, grad_out, lse, own, dims, b, h, T, H, d, s_t, s_d, sg_t, sg_d)
        D = tl.sum(do * _tile(out, own, dims, T, d, so_t, so_d).to(tl.float32), axis=1)
        tl.store(delta + (b * H + h) * T + own, D, mask=own < T)
        dq = tl.zeros((BLOCK, BLOCK_D), dtype=tl.float32)
        for j0 in range(tl.maximum(n0 - before, 0), tl.minimum(n0 + BLOCK + after, T), BLOCK):
            cols = j0 + tl.arange(0, BLOCK)
            k, v = _keys_values(at, cols, dims, T, d, s_t, s_p, s_d)
            seen = _seen(own[:, None], cols[None, :], T, W, padding_mask, spm_b, spm_t, b, HAS_MASK, CAUSAL)
            p = tl.where(seen, tl.exp(_dot(q, tl.trans(k), OP) * scale - m[:, None]), 0.0)
            dq += _dot(p * (_dot(do, tl.trans(v), OP) - D[:, None]), k, OP)
        tl.store(grad, (dq * scale).to(grad.dtype.element_ty), mask=inside)


def backward_tiles(arch: Optional[int]) -> dict:
    """The backward's tiles on a GPU of compute capability `arch` (75 for 7.5; None: the
    interpreter): BLOCK queries or keys a program, 16 below 8.0 (sm_70, sm_75), where
    32 needs more than a thread's 255 registers and spills to memory."""
    return {"BLOCK": 16 if arch is not None and arch < 80 else BLOCK}


_backward_kernel.tiles_for = backward_tiles  # benchmarks.triton_compile compiles each GPU's own


def _launch(kernel, qkv, W, causal, padding_mask, *tensors, strided=(), BLOCK=BLOCK, **constants):
    """Launches `kernel` over (blocks of BLOCK positions, rows x heads) with qkv's sizes and the
    strides of qkv, then of each of `strided`."""
    B, T, _, H, d = qkv.shape
    kernel[(triton.cdiv(T, BLOCK), B * H)](
        qkv, *tensors, padding_mask, T, H, W, d, d ** -0.5,
        *qkv.stride(), *(n for t in strided for n in t.stride()), *strides(padding_mask, 2),
        HAS_MASK=padding_mask is not None, CAUSAL=causal, OP=OPERANDS[qkv.dtype], BLOCK=BLOCK,
        BLOCK_D=max(16, triton.next_power_of_2(d)), **constants,
    )


class _Window(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qkv: Tensor, W: int, causal: bool, padding_mask: Optional[Tensor]) -> Tensor:
        B, T, _, H, d = qkv.shape
        out = qkv.new_empty(B, T, H, d)
        lse = qkv.new_empty(B, H, T, dtype=torch.float32)
        _launch(_forward_kernel, qkv, W, causal, padding_mask, out, lse, strided=(out,))
        ctx.save_for_backward(qkv, out, lse, padding_mask)
        ctx.W, ctx.causal = W, causal
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        qkv, out, lse, padding_mask = ctx.saved_tensors
        grad = torch.empty_like(qkv, memory_format=torch.contiguous_format)
        delta = torch.empty_like(lse)
        tiles = backward_tiles(capability(qkv))
        for keys in (False, True):  # the queries' programs write D, which the keys' read
            _launch(_backward_kernel, qkv, ctx.W, ctx.causal, padding_mask, out, grad_out, lse, delta, grad,
                    strided=(out, grad_out, grad), KEYS=keys, **tiles)
        return grad, None, None, None


@on_its_device
def window(qkv: Tensor, W: int, causal: bool, padding_mask: Optional[Tensor] = None) -> Tensor:
    """``local.window`` on q, k, v as one projection qkv (B, T, 3, H, d) (any strides), in
    one of KERNEL_DTYPES: (B, T, H, d) in qkv's dtype, differentiable."""
    return _Window.apply(qkv, W, causal, padding_mask)


# -- decoding ----------------------------------------------------------------------------


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


@on_its_device
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
