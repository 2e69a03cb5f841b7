"""Kernel attention's decoding step as one Triton kernel.

The function of ``performer.causal_step`` (same arguments, same state), for
decoding only (no autograd: the state is updated in place). Per batch row and
head, one program reads the step's features and value, moves the stabilized
sums [S, z] and their reference M, and writes phi(q).S / max(phi(q).z, floor):
the dozen small operators of the torch step in one launch. On CUDA it runs
compiled; elsewhere only through Triton's interpreter (TRITON_INTERPRET=1,
which the tests use).
"""
import math
from typing import Optional, Tuple

import triton
import triton.language as tl
from torch import Tensor

from .common import State, strides
from .performer import LOWEST, TINY, empty_state
from .triton_common import on_its_device

BLOCK_M = 32  # feature rows of [S, z] a program moves at a time


@triton.jit
def _log_sigmoid(x):
    return tl.minimum(x, 0.0) - tl.log(1.0 + tl.exp(-tl.abs(x)))


@triton.jit
def _favor_exponents(x, half_sq, W, rows, dims, m, dk, sW_m, sW_d):
    """FAVOR+'s exponents w_r . x' - |x'|^2 / 2 at feature rows `rows` (x = x', scaled by d^-1/4)."""
    w = tl.load(W + rows[:, None] * sW_m + dims[None, :] * sW_d, mask=(rows[:, None] < m) & (dims[None, :] < dk),
                other=0.0).to(tl.float32)
    return tl.sum(w * x[None, :], axis=1) - half_sq


@triton.jit
def _step_kernel(
    phi_q, phi_k, v, S, M, out, log_scale, gate_logits, q_log_scale, padding_mask, W,
    H, m, d, dk,
    sq_b, sq_h, sq_m, sk_b, sk_h, sk_m, sv_b, sv_h, sv_d, sS_b, sS_h, sS_m, sS_d, sM_b, sM_h,
    so_b, so_h, so_d, sl_b, sl_h, sg_b, sg_h, sql_b, sql_h, spm_b, sW_m, sW_d,
    log_eps, lowest, tiny, x_scale, half_log_m,
    WEIGHTED: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_GATE: tl.constexpr, HAS_Q_SCALE: tl.constexpr,
    HAS_MASK: tl.constexpr, HAS_EPS: tl.constexpr, FAVOR: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
):
    b = tl.program_id(0) // H
    h = tl.program_id(0) % H
    cols = tl.arange(0, BLOCK_D)
    value = tl.load(v + b * sv_b + h * sv_h + cols * sv_d, mask=cols < d, other=0.0).to(tl.float32)
    if HAS_MASK:
        padded = tl.load(padding_mask + b * spm_b) != 0
    M_old = tl.load(M + b * sM_b + h * sM_h)
    if FAVOR:  # phi_q, phi_k hold q and k: their features' largest exponents s_q, s_k first
        dims = tl.arange(0, BLOCK_K)
        xq = tl.load(phi_q + b * sq_b + h * sq_h + dims * sq_m, mask=dims < dk, other=0.0).to(tl.float32) * x_scale
        xk = tl.load(phi_k + b * sk_b + h * sk_h + dims * sk_m, mask=dims < dk, other=0.0).to(tl.float32) * x_scale
        half_q = tl.sum(xq * xq, axis=0) * 0.5
        half_k = tl.sum(xk * xk, axis=0) * 0.5
        top_q = tl.full((BLOCK_M,), -float("inf"), tl.float32)
        top_k = tl.full((BLOCK_M,), -float("inf"), tl.float32)
        for m0 in range(0, m, BLOCK_M):
            rows = m0 + tl.arange(0, BLOCK_M)
            top_q = tl.maximum(top_q, tl.where(rows < m, _favor_exponents(xq, half_q, W, rows, dims, m, dk, sW_m,
                                                                          sW_d), -float("inf")))
            top_k = tl.maximum(top_k, tl.where(rows < m, _favor_exponents(xk, half_k, W, rows, dims, m, dk, sW_m,
                                                                          sW_d), -float("inf")))
        s_q = tl.max(top_q, axis=0)
        s_k = tl.max(top_k, axis=0)

    # the new key's weight w_new and the old sums' w_old, relative to the new reference
    w_old = 1.0
    w_new = 1.0
    if WEIGHTED:
        a = 0.0
        lg = 0.0
        if FAVOR:
            a = s_k - half_log_m
        elif HAS_SCALE:
            a = tl.load(log_scale + b * sl_b + h * sl_h).to(tl.float32)
        if HAS_GATE:
            g = tl.load(gate_logits + b * sg_b + h * sg_h).to(tl.float32)
            a = a + _log_sigmoid(-g)  # log(1 - g)
            lg = _log_sigmoid(g)  # log g
        r = a - lg
        if HAS_MASK:  # a padded key: weight 0, no decay
            r = tl.where(padded, -float("inf"), r)
            lg = tl.where(padded, 0.0, lg)
        R_raw = tl.maximum(M_old, r)
        R = R_raw
        if HAS_MASK:
            R = tl.maximum(R_raw, lowest)
        w_old = tl.exp(M_old - R)
        w_new = tl.exp(r - R)
        M_new = R_raw + lg
        offset = tl.maximum(M_new, lowest)
    else:  # weight 1: the reference is 0 once a real key is seen
        M_new = tl.maximum(M_old, 0.0)
        if HAS_MASK:
            w_new = tl.where(padded, 0.0, 1.0)
            M_new = tl.where(padded, M_old, M_new)
        offset = 0.0

    num = tl.zeros((BLOCK_D,), dtype=tl.float32)
    den = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for m0 in range(0, m, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        if FAVOR:  # phi = exp(exponent - its largest): the largest feature is 1
            pq = tl.where(rows < m, tl.exp(_favor_exponents(xq, half_q, W, rows, dims, m, dk, sW_m, sW_d) - s_q), 0.0)
            kw = tl.where(rows < m, tl.exp(_favor_exponents(xk, half_k, W, rows, dims, m, dk, sW_m, sW_d) - s_k),
                          0.0) * w_new
        else:
            pq = tl.load(phi_q + b * sq_b + h * sq_h + rows * sq_m, mask=rows < m, other=0.0).to(tl.float32)
            kw = tl.load(phi_k + b * sk_b + h * sk_h + rows * sk_m, mask=rows < m, other=0.0).to(tl.float32) * w_new
        at = S + b * sS_b + h * sS_h + rows[:, None] * sS_m + cols[None, :] * sS_d
        inside = (rows[:, None] < m) & (cols[None, :] < d)
        Sv = w_old * tl.load(at, mask=inside, other=0.0) + kw[:, None] * value[None, :]
        tl.store(at, Sv, mask=inside)
        z_at = S + b * sS_b + h * sS_h + rows * sS_m + d * sS_d
        z = w_old * tl.load(z_at, mask=rows < m, other=0.0) + kw
        tl.store(z_at, z, mask=rows < m)
        num += tl.sum(pq[:, None] * Sv, axis=0)
        den += pq * z
    den = tl.sum(den, axis=0)

    floor = tiny
    if HAS_EPS:  # eps in true scale: the stabilized normalizer times exp(offset + the query's log-scale)
        log_offset = offset
        if FAVOR:
            log_offset = log_offset + s_q - half_log_m
        elif HAS_Q_SCALE:
            log_offset = log_offset + tl.load(q_log_scale + b * sql_b + h * sql_h).to(tl.float32)
        floor = tl.exp(tl.minimum(tl.maximum(log_eps - log_offset, tl.log(tiny)), log_eps + 80.0))
    tl.store(out + b * so_b + h * so_h + cols * so_d, num / tl.maximum(den, floor), mask=cols < d)
    tl.store(M + b * sM_b + h * sM_h, M_new)


@on_its_device
def causal_step(phi_q: Tensor, phi_k: Tensor, v: Tensor, state: Optional[State] = None, padding_mask=None,
                log_scale=None, gate_logits=None, q_log_scale=None, *, eps: float,
                projection: Optional[Tensor] = None) -> Tuple[Tensor, State]:
    """``performer.causal_step`` (the same arguments, any strides) in one kernel, the
    state (float32) updated in place; returns out (B, H, d) in v's dtype. With
    `projection` (m, dk), phi_q and phi_k are FAVOR+'s inputs q, k (B, H, dk), and the
    kernel computes their features and log-scales as ``performer.favor_features`` does."""
    B, H = v.shape[:2]
    d = v.shape[-1]
    m = phi_k.shape[-1] if projection is None else projection.shape[0]
    state = state if state is not None else empty_state(B, H, m, d, v)
    S, M = state["S"], state["M"]
    out = v.new_empty(B, H, d)
    favor = projection is not None
    _step_kernel[(B * H,)](
        phi_q, phi_k, v, S, M, out, log_scale, gate_logits, q_log_scale, padding_mask, projection,
        H, m, d, phi_k.shape[-1],
        *phi_q.stride(), *phi_k.stride(), *v.stride(), *S.stride(), *M.stride(), *out.stride(),
        *strides(log_scale, 2), *strides(gate_logits, 2), *strides(q_log_scale, 2), *strides(padding_mask, 1),
        *strides(projection, 2),
        math.log(eps) if eps else 0.0, LOWEST, TINY, phi_k.shape[-1] ** -0.25, 0.5 * math.log(m),
        WEIGHTED=favor or log_scale is not None or gate_logits is not None, HAS_SCALE=log_scale is not None,
        HAS_GATE=gate_logits is not None, HAS_Q_SCALE=q_log_scale is not None, HAS_MASK=padding_mask is not None,
        HAS_EPS=bool(eps), FAVOR=favor, BLOCK_M=BLOCK_M, BLOCK_D=triton.next_power_of_2(d),
        BLOCK_K=triton.next_power_of_2(phi_k.shape[-1]) if favor else 1,
    )
    return out, {"S": S, "M": M}


@on_its_device
def favor_step(q: Tensor, k: Tensor, v: Tensor, projection: Tensor, state: Optional[State] = None,
               padding_mask=None, gate_logits=None, *, eps: float) -> Tuple[Tensor, State]:
    """``causal_step`` on FAVOR+'s features of q and k (B, H, dk) with `projection` (m, dk)."""
    return causal_step(q, k, v, state, padding_mask, None, gate_logits, None, eps=eps, projection=projection)
