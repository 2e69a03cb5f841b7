"""FLASH's decoding step (mixed chunk attention) as one Triton kernel.

From the gated attention unit's projection [U | V | Z] before its SiLU, one
program per batch row computes what ``flash_gau``'s step computes with
``ops.flash``: the SiLU of the three, the four offset-scaled heads of Z (q,
k for the chunk, ql, kl for the linear part), RoPE at the row's position,
relu^2 scores against the current chunk's keys weighted by
``slot_weights``' table, the linear part read from the sum
of every token's k' v^T less the current chunk's tokens before this one (the
correction (q' . k'_j) v_j folded into the slots' weights, which are computed
once a step into a (B, G) scratch and read for every block of value
columns), U times their sum; and it advances the state as
``ops.flash.causal_step`` does (the chunk's slots written, k' v^T added).
A padded step reads the state and leaves it unchanged. The kernel takes the
state's buffers contiguous, as ``ops.flash`` makes and keeps them, and
derives their strides from the sizes: a launch passes 20 arguments, each of
which Triton's launcher binds on the host every step. Decoding only (no
autograd): the state is updated in place. On CUDA it runs compiled;
elsewhere only through Triton's interpreter (TRITON_INTERPRET=1, which the
tests use), which runs a program's threads as one, so the barrier between
writing the scratch and reading it is checked only by reading the code.
"""
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from .common import State, strides
from .flash import empty_state, rope_freqs, slot_weights, with_room, with_sum
from .triton_common import _silu, on_its_device

BLOCK_G = 32  # chunk slots a program scores at a time
BLOCK_E = 32  # value columns a program moves at a time
# 8 warps, and 32 value columns a pass: compiled for sm_90 (benchmarks.triton_compile), the
# program keeps its (s/2, BLOCK_E) tiles of the linear sums in registers without spilling
# them (with 4 warps and 64 columns it needs all 255 registers a thread has, and more)
NUM_WARPS = 8


@triton.jit
def _heads(z_even, z_odd, gamma, beta, head, pairs, s, mask):
    """Head `head` of the offset-scale, z * gamma_h + beta_h, as its (even, odd) pair halves."""
    g_even = tl.load(gamma + head * s + 2 * pairs, mask=mask, other=0.0).to(tl.float32)
    g_odd = tl.load(gamma + head * s + 2 * pairs + 1, mask=mask, other=0.0).to(tl.float32)
    b_even = tl.load(beta + head * s + 2 * pairs, mask=mask, other=0.0).to(tl.float32)
    b_odd = tl.load(beta + head * s + 2 * pairs + 1, mask=mask, other=0.0).to(tl.float32)
    return z_even * g_even + b_even, z_odd * g_odd + b_odd


@triton.jit
def _turned(x_even, x_odd, cos, sin):
    """RoPE: each pair (x_2j, x_2j+1) as a complex number times e^(i angle_j)."""
    return x_even * cos - x_odd * sin, x_even * sin + x_odd * cos


@triton.jit
def _gau_step_kernel(
    uvz, gamma, beta, freqs, rel_bias, padding_mask, weights_table, out, scratch,
    k_chunk, kl_chunk, v_chunk, kv_sum, position,
    s, e, G, scale, s_uvz, s_mask,
    ROPE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_E: tl.constexpr,
):
    b = tl.program_id(0)
    pairs = tl.arange(0, BLOCK_P)
    has_pair = pairs < s // 2
    if HAS_MASK:
        real = tl.load(padding_mask + b * s_mask) == 0
    p = tl.load(position + b)
    fill = p % G
    done = p - fill
    u = uvz + b * s_uvz  # the row's U, then V at e, then Z at 2e
    k_chunk += b * G * s
    kl_chunk += b * G * s
    v_chunk += b * G * e
    kv_sum += b * s * e

    z_even = _silu(tl.load(u + 2 * e + 2 * pairs, mask=has_pair, other=0.0).to(tl.float32))
    z_odd = _silu(tl.load(u + 2 * e + 2 * pairs + 1, mask=has_pair, other=0.0).to(tl.float32))
    q_even, q_odd = _heads(z_even, z_odd, gamma, beta, 0, pairs, s, has_pair)
    k_even, k_odd = _heads(z_even, z_odd, gamma, beta, 1, pairs, s, has_pair)
    ql_even, ql_odd = _heads(z_even, z_odd, gamma, beta, 2, pairs, s, has_pair)
    kl_even, kl_odd = _heads(z_even, z_odd, gamma, beta, 3, pairs, s, has_pair)
    if ROPE:
        angle = p.to(tl.float32) * tl.load(freqs + pairs, mask=has_pair, other=0.0)
        cos = tl.cos(angle)
        sin = tl.sin(angle)
        q_even, q_odd = _turned(q_even, q_odd, cos, sin)
        k_even, k_odd = _turned(k_even, k_odd, cos, sin)
        ql_even, ql_odd = _turned(ql_even, ql_odd, cos, sin)
        kl_even, kl_odd = _turned(kl_even, kl_odd, cos, sin)
    slot_k = k_chunk + fill * s
    slot_kl = kl_chunk + fill * s
    writes = has_pair
    if HAS_MASK:  # a padded step sees what its slot holds, and writes nothing
        k_even = tl.where(real, k_even, tl.load(slot_k + 2 * pairs, mask=has_pair, other=0.0))
        k_odd = tl.where(real, k_odd, tl.load(slot_k + 2 * pairs + 1, mask=has_pair, other=0.0))
        kl_even = tl.where(real, kl_even, 0.0)
        kl_odd = tl.where(real, kl_odd, 0.0)
        writes = has_pair & real
    qk_now = tl.sum(q_even * k_even + q_odd * k_odd, axis=0)

    # 1 / (tokens in completed chunks), 0 while there are none
    linear_scale = tl.minimum(done, 1).to(tl.float32) / tl.maximum(done, 1).to(tl.float32)

    # each slot's weight, once a step: relu^2 of the score times slot_weights' row (1/c, 0 past fill),
    # less the linear part's correction for the current chunk's earlier tokens, which the sum holds;
    # into the row's scratch, which every thread then reads
    for g0 in range(0, fill + 1, BLOCK_G):
        slots = g0 + tl.arange(0, BLOCK_G)
        seen = slots <= fill
        keys = k_chunk + slots[:, None] * s + 2 * pairs[None, :]
        kc_even = tl.load(keys, mask=seen[:, None] & has_pair[None, :], other=0.0)
        kc_odd = tl.load(keys + 1, mask=seen[:, None] & has_pair[None, :], other=0.0)
        scores = tl.sum(kc_even * q_even[None, :] + kc_odd * q_odd[None, :], axis=1)
        scores = tl.where(slots == fill, qk_now, scores) * scale
        if HAS_BIAS:
            scores += tl.load(rel_bias + fill - slots + G - 1, mask=seen, other=0.0).to(tl.float32)
        weights = tl.maximum(scores, 0.0) * tl.maximum(scores, 0.0) * tl.load(
            weights_table + fill * G + slots, mask=seen, other=0.0)
        earlier = slots < fill
        lkeys = kl_chunk + slots[:, None] * s + 2 * pairs[None, :]
        klc_even = tl.load(lkeys, mask=earlier[:, None] & has_pair[None, :], other=0.0)
        klc_odd = tl.load(lkeys + 1, mask=earlier[:, None] & has_pair[None, :], other=0.0)
        weights -= tl.sum(klc_even * ql_even[None, :] + klc_odd * ql_odd[None, :], axis=1) * linear_scale
        tl.store(scratch + b * G + slots, weights, mask=seen)
    tl.debug_barrier()

    for e0 in range(0, e, BLOCK_E):
        cols = e0 + tl.arange(0, BLOCK_E)
        has_col = cols < e
        v_now = _silu(tl.load(u + e + cols, mask=has_col, other=0.0).to(tl.float32))
        slot_v = v_chunk + fill * e + cols
        if HAS_MASK:
            v_now = tl.where(real, v_now, tl.load(slot_v, mask=has_col, other=0.0))
        # quadratic part: the chunk's slots 0 .. fill, this step's value in slot fill
        quad = tl.zeros((BLOCK_E,), dtype=tl.float32)
        for g0 in range(0, fill + 1, BLOCK_G):
            slots = g0 + tl.arange(0, BLOCK_G)
            seen = slots <= fill
            weights = tl.load(scratch + b * G + slots, mask=seen, other=0.0)
            values = tl.load(v_chunk + slots[:, None] * e + cols[None, :], mask=seen[:, None] & has_col[None, :],
                             other=0.0)
            values = tl.where(slots[:, None] == fill, v_now[None, :], values)
            quad += tl.sum(weights[:, None] * values, axis=0)
        # linear part: ql over the sum's mean; then this token's k' v^T into the sum
        rows_even = 2 * pairs[:, None]
        both = has_pair[:, None] & has_col[None, :]
        at_even = kv_sum + rows_even * e + cols[None, :]
        sum_even = tl.load(at_even, mask=both, other=0.0)
        sum_odd = tl.load(at_even + e, mask=both, other=0.0)
        lin = tl.sum(ql_even[:, None] * sum_even + ql_odd[:, None] * sum_odd, axis=0) * linear_scale
        u_now = _silu(tl.load(u + cols, mask=has_col, other=0.0).to(tl.float32))
        tl.store(out + b * e + cols, u_now * (quad + lin), mask=has_col)

        tl.store(at_even, sum_even + kl_even[:, None] * v_now[None, :], mask=both)
        tl.store(at_even + e, sum_odd + kl_odd[:, None] * v_now[None, :], mask=both)
        tl.store(slot_v, v_now, mask=has_col)
    tl.store(slot_k + 2 * pairs, k_even, mask=has_pair)
    tl.store(slot_k + 2 * pairs + 1, k_odd, mask=has_pair)
    tl.store(slot_kl + 2 * pairs, kl_even, mask=writes)
    tl.store(slot_kl + 2 * pairs + 1, kl_odd, mask=writes)
    if HAS_MASK:
        tl.store(position + b, p + real.to(p.dtype))
    else:
        tl.store(position + b, p + 1)


@on_its_device
def gau_step(
    uvz: Tensor, gamma: Tensor, beta: Tensor, state: Optional[State], padding_mask: Optional[Tensor] = None,
    rel_bias: Optional[Tensor] = None, *, e: int, rope: bool, chunk_size: int, relu2_norm: str,
) -> Tuple[Tensor, State]:
    """U * (the mixed chunk attention of one step) and the state after it: uvz (B, 2e + s)
    the unit's projection [U | V | Z] before the SiLU, its rows contiguous; gamma, beta
    (4, s) the offset-scale of q, k, ql, kl, contiguous (the unit's parameters); state
    as ``ops.flash.empty_state`` makes it, updated in place (one holding fewer of the
    G slots and no sum yet, as the torch step's on the CPU, is given all G and its sum
    first). Returns (B, e) in uvz's dtype."""
    B, s = uvz.shape[0], uvz.shape[1] - 2 * e
    state = empty_state(B, chunk_size, s, e, uvz, slots=chunk_size) if state is None else state
    state = with_sum(with_room(state, chunk_size, chunk_size))  # the kernel reads all G slots and the sum
    out = uvz.new_empty(B, e)
    scratch = uvz.new_empty(B, chunk_size, dtype=torch.float32)  # each row's slot weights of the step
    _gau_step_kernel[(B,)](
        uvz, gamma, beta, rope_freqs(s, 10000.0, uvz.device), rel_bias, padding_mask,
        slot_weights(chunk_size, relu2_norm, uvz.device), out, scratch,
        state["k_chunk"], state["kl_chunk"], state["v_chunk"], state["kv_sum"], state["position"],
        s, e, chunk_size, s ** -0.5, uvz.stride(0), *strides(padding_mask, 1),
        ROPE=rope, HAS_BIAS=rel_bias is not None, HAS_MASK=padding_mask is not None,
        BLOCK_P=triton.next_power_of_2(s // 2), BLOCK_G=BLOCK_G, BLOCK_E=BLOCK_E, num_warps=NUM_WARPS,
    )
    return out, state
