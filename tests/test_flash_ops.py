"""FLASH mixed chunk attention math: reference == chunked == recurrent
(outputs and gradients), chunk boundaries, padding on either side, and
low precision."""
import math

import pytest
import torch

from linear_fairseq.ops import flash as F

RTOL = 1e-5
S, E = 8, 12


def assert_close(actual, expected, rtol=RTOL):
    scale = expected.abs().max().clamp(min=1.0)
    err = (actual - expected).abs().max()
    assert err <= rtol * scale, f"max abs error {err:.3g} > {rtol:g} x {scale:.3g}"


def inputs(B, T, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q, k, ql, kl = (torch.randn(B, T, S, generator=g, dtype=dtype) for _ in range(4))
    return q, k, ql, kl, torch.randn(B, T, E, generator=g, dtype=dtype)


def grads(out, w, xs):
    """Gradients, zero for inputs the output does not use (e.g. linear keys before a chunk completes)."""
    got = torch.autograd.grad((out * w).sum(), xs, allow_unused=True)
    return [torch.zeros_like(x) if g is None else g for g, x in zip(got, xs)]


# the three forms with this file's argument order: chunk size G, then causal, mask, bias; the paper's relu^2 scale
def naive(q, k, ql, kl, v, G, causal, padding_mask=None, rel_bias=None, relu2_norm="chunk"):
    return F.naive(q, k, ql, kl, v, causal, padding_mask, rel_bias, chunk_size=G, relu2_norm=relu2_norm)


def mixed_chunk(q, k, ql, kl, v, G, causal, padding_mask=None, rel_bias=None, relu2_norm="chunk"):
    return F.mixed_chunk(q, k, ql, kl, v, causal, padding_mask, rel_bias, chunk_size=G, relu2_norm=relu2_norm)


def recurrent(q, k, ql, kl, v, G, padding_mask=None, rel_bias=None, relu2_norm="chunk", state=None):
    state = state or F.empty_state(q.shape[0], G, S, E, v)
    outs = []
    for t in range(q.shape[1]):
        mask_t = None if padding_mask is None else padding_mask[:, t]
        out, state = F.causal_step(q[:, t], k[:, t], ql[:, t], kl[:, t], v[:, t], state, mask_t, rel_bias,
                                   chunk_size=G, relu2_norm=relu2_norm)
        outs.append(out)
    return torch.stack(outs, dim=1), state


@pytest.mark.parametrize("T,G", [(1, 4), (3, 4), (4, 4), (13, 4), (64, 16), (301, 32), (300, 1)])
def test_causal_chunked_and_recurrent_equal_reference_with_gradients(T, G):
    xs = [x.requires_grad_() for x in inputs(2, T)]
    w = torch.randn(2, T, E, generator=torch.Generator().manual_seed(7))
    ref = naive(*xs, G, causal=True)
    ref_grads = grads(ref, w, xs)
    for out in (mixed_chunk(*xs, G, causal=True), recurrent(*xs, G)[0]):
        assert_close(out, ref)
        for g, g_ref in zip(grads(out, w, xs), ref_grads):
            assert_close(g, g_ref)


@pytest.mark.parametrize("padded", [True, False])
@pytest.mark.parametrize("norm", F.RELU2_NORMS)
@pytest.mark.parametrize("T,G", [(3, 4), (13, 4), (16, 4), (70, 16)])
def test_every_relu2_norm_agrees_across_forms_with_gradients_and_padding(norm, T, G, padded):
    """reference == chunked == recurrent for each normalization of relu^2, across
    chunk boundaries, with left padding on one row or none (outputs and gradients;
    T = 16, G = 4: whole chunks, where the chunked form applies no mask)."""
    xs = [x.requires_grad_() for x in inputs(2, T, seed=5)]
    mask = torch.zeros(2, T, dtype=torch.bool)
    mask[1, :2] = padded
    real = (~mask).unsqueeze(-1)
    w = torch.randn(2, T, E, generator=torch.Generator().manual_seed(7))
    for causal in (True, False):
        given = mask if padded else None
        ref = naive(*xs, G, causal, given, relu2_norm=norm) * real
        ref_grads = grads(ref, w, xs)
        outs = [mixed_chunk(*xs, G, causal, given, relu2_norm=norm)]
        if causal:
            outs.append(recurrent(*xs, G, given, relu2_norm=norm)[0])
        for out in outs:
            assert_close(out * real, ref)
            for g, g_ref in zip(grads(out * real, w, xs), ref_grads):
                assert_close(g, g_ref)


def test_relu2_norms_scale_the_quadratic_part_as_documented():
    """With no linear part and every key equal, "keys" is a mean of the values
    (independent of G), "chunk" sums / G and "none" sums."""
    T, G = 6, 8
    q = k = torch.ones(1, T, S)
    zeros = torch.zeros(1, T, S)
    v = torch.randn(1, T, E, generator=torch.Generator().manual_seed(1))
    r = (S**0.5) ** 2  # relu(q.k / sqrt(s))^2 with q = k = 1
    prefix_sum = v.cumsum(1)
    seen = torch.arange(1, T + 1).view(1, T, 1)
    expected = {"keys": r * prefix_sum / seen, "chunk": r * prefix_sum / G, "none": r * prefix_sum}
    for norm, want in expected.items():
        assert_close(mixed_chunk(q, k, zeros, zeros, v, G, True, relu2_norm=norm), want)
        assert_close(F.quadratic(q, k, v, True, chunk_size=G, relu2_norm=norm), want)


def test_unknown_relu2_norm_is_named():
    with pytest.raises(ValueError, match="relu2_norm='mean'; choose from keys, chunk, none"):
        mixed_chunk(*inputs(1, 4), 4, causal=True, relu2_norm="mean")


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("T,G", [(3, 4), (37, 8)])
def test_relative_position_bias_in_every_form(causal, T, G):
    xs = [x.requires_grad_() for x in inputs(2, T)]
    bias = (torch.randn(2 * G - 1, generator=torch.Generator().manual_seed(4)) * 2).requires_grad_()
    mask = torch.zeros(2, T, dtype=torch.bool)
    mask[1, :2] = True  # left padding: offsets count real tokens
    real = (~mask).unsqueeze(-1)  # outputs at padded positions are not defined
    ref = naive(*xs, G, causal, mask, bias) * real
    w = torch.randn(2, T, E, generator=torch.Generator().manual_seed(7))
    ref_grads = grads(ref, w, [*xs, bias])
    outs = [mixed_chunk(*xs, G, causal, mask, bias)] + ([recurrent(*xs, G, mask, bias)[0]] if causal else [])
    for out in outs:
        out = out * real
        assert_close(out, ref)
        for g, g_ref in zip(grads(out, w, [*xs, bias]), ref_grads):
            assert_close(g, g_ref)
    assert (ref - naive(*xs, G, causal, mask) * real).abs().max() > 1e-3  # the bias matters


@pytest.mark.parametrize("T,G", [(5, 4), (64, 16), (300, 32)])
def test_noncausal_chunked_equals_reference(T, G):
    xs = inputs(2, T)
    assert_close(mixed_chunk(*xs, G, causal=False), naive(*xs, G, causal=False))


def test_linear_part_sees_only_completed_chunks():
    """A linear key of chunk 1 (position 5) reaches outputs only from chunk 2 on,
    in the training form and in decoding alike. (Decoding reads the completed
    chunks as the sum over every token less the current chunk's: within chunk 1
    the key reaches the outputs as float32 rounding of that difference, about
    1e-6 here, where from chunk 2 on it moves them by 0.4 and more.)"""
    G, T = 4, 12
    xs = list(inputs(1, T))
    xs[3] = xs[3].clone()
    for form in (lambda *a: mixed_chunk(*a, G, causal=True), lambda *a: recurrent(*a, G)[0]):
        base = form(*xs)
        moved = list(xs)
        moved[3] = xs[3].clone()
        moved[3][:, 5] += 3.0
        changed = (form(*moved) - base).abs().amax(-1)[0] > 1e-4
        assert changed.tolist() == [False] * 8 + [True] * 4


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_never_leaks(causal, side):
    T, pad, G = 10, 6, 4
    xs = inputs(1, T)
    garbage = [torch.full((1, pad, x.shape[-1]), 7.0) for x in xs]
    cat = (lambda g, x: torch.cat([g, x], 1)) if side == "left" else (lambda g, x: torch.cat([x, g], 1))
    padded = [cat(g, x) for g, x in zip(garbage, xs)]
    mask = torch.zeros(1, T + pad, dtype=torch.bool)
    mask[:, :pad] = side == "left"
    mask[:, T:] = side == "right"
    real = slice(pad, None) if side == "left" else slice(0, T)
    ref = naive(*xs, G, causal)
    assert_close(naive(*padded, G, causal, mask)[:, real], ref)
    assert_close(mixed_chunk(*padded, G, causal, mask)[:, real], ref)
    if causal:
        assert_close(recurrent(*padded, G, mask)[0][:, real], ref)


def test_a_padded_step_anywhere_leaves_the_state_unchanged():
    """Padded steps between real ones (garbage inputs), one where the chunk's last
    slot is next (fill = G - 1) and one at a chunk's start: the real steps' outputs
    and the final state are those of the sequence without them."""
    G, T = 4, 10
    xs = inputs(2, T, seed=9)
    at = [3, 4 + 4]  # after 3 real tokens (fill 3 = G - 1), after 7 (fill 3 again, in the second chunk)
    garbage = inputs(2, len(at), seed=10)
    padded = [torch.cat([x[:, :3], g[:, :1], x[:, 3:7], g[:, 1:], x[:, 7:]], 1) for x, g in zip(xs, garbage)]
    mask = torch.zeros(2, T + len(at), dtype=torch.bool)
    mask[:, at] = True
    out, state = recurrent(*padded, G, mask)
    ref, ref_state = recurrent(*xs, G)
    assert_close(out[:, ~mask[0]], ref)
    assert_close(out[:, ~mask[0]], naive(*xs, G, causal=True))
    for name, x in ref_state.items():
        assert torch.equal(state[name], x) if x.dtype == torch.long else torch.allclose(state[name], x, atol=1e-6), name


def test_batch_rows_with_different_padding_match_each_row_alone():
    G = 4
    xs = inputs(3, 11)
    mask = torch.zeros(3, 11, dtype=torch.bool)
    mask[1, :5] = True  # left padding
    mask[2, 7:] = True  # right padding
    out = mixed_chunk(*xs, G, True, mask)
    for b, real in ((0, slice(None)), (1, slice(5, None)), (2, slice(0, 7))):
        alone = naive(*(x[b : b + 1, real] for x in xs), G, True)
        assert_close(out[b : b + 1, real], alone)


def test_state_is_bounded():
    """The state's size stops growing once a chunk is complete: G slots and the s x e sum
    (on the CPU it holds fewer slots and no sum before, with_room and with_sum)."""
    G = 8
    sizes = {}
    for T in (5, 9, 200):
        _, state = recurrent(*inputs(2, T), G)
        sizes[T] = sum(t.numel() for t in state.values())
    assert sizes[5] < sizes[9] == sizes[200] == 2 * (G * (2 * S + E) + S * E + 1)


@pytest.mark.parametrize("t0", [3, 8, 11], ids=["inside-the-first-chunk", "as-it-completes", "after-a-chunk"])
@pytest.mark.parametrize("order", [[1, 1, 0, 3], [3, 0]], ids=["same-batch", "batch-shrinks"])
@pytest.mark.parametrize("on_cpu", [True, False], ids=["cpu-path", "gpu-path"])
def test_reorder_continues_each_rows_new_prefix(t0, order, on_cpu, monkeypatch):
    """After reorder, row i continues the prefix of row order[i] exactly as the
    reference over the spliced sequences does; on the CPU an order that keeps
    the batch size reuses the chunk buffers (moving their filled prefix), and on
    a GPU's path (reads_back_free false: every slot read and moved, no fill read
    back) the buffers are index-selected whole, as they are on the CPU where
    every slot is read (a state without a sum whose first chunk has just
    completed: the next step sums it from the buffers). Either way every state
    tensor stays contiguous, as the fused step (ops.flash_triton) reads them."""
    from linear_fairseq.ops import common
    monkeypatch.setattr(common, "reads_back_free", lambda x: on_cpu)
    G, T = 8, 20
    order = torch.tensor(order)
    first, later = inputs(4, T, seed=1), inputs(4, T, seed=2)
    spliced = [torch.cat([a[order, :t0], b[: len(order), t0:]], dim=1) for a, b in zip(first, later)]
    with torch.no_grad():
        _, state = recurrent(*(x[:, :t0] for x in first), G)
        moved = F.reorder(state, order, G)
        assert (moved["k_chunk"] is state["k_chunk"]) == (len(order) == 4 and on_cpu and t0 != G)
        outs = []
        for t in range(t0, T):
            assert all(x.is_contiguous() for x in moved.values())
            out, moved = F.causal_step(*(x[:, t] for x in spliced), moved, chunk_size=G, relu2_norm="chunk")
            outs.append(out)
    assert_close(torch.stack(outs, dim=1), naive(*spliced, G, True)[:, t0:])


@pytest.mark.parametrize("rel_bias", [False, True], ids=["no-bias", "rel-bias"])
def test_state_grows_as_its_chunk_fills_and_decodes_as_the_whole_one(rel_bias, monkeypatch):
    """On the CPU causal_step's own state starts with one slot of the chunk's G and
    no sum: its slots double as the fullest row's fill needs, to G at most, and it
    gains the sum at the step after a row completes its first chunk. It writes the
    outputs and state of a state holding all G slots and the sum from the start,
    through a padded row, a reorder within the first chunk (same batch, then a
    smaller one) and chunks completed. Where the fill is not read back (a GPU) the
    state holds all G and the sum at once."""
    from linear_fairseq.ops import common
    G, T = 8, 21
    xs = inputs(3, T, seed=5)
    mask = torch.zeros(3, T, dtype=torch.bool)
    mask[2, :3] = True  # row 2 starts 3 steps late: its fill trails the others'
    bias = torch.randn(2 * G - 1, generator=torch.Generator().manual_seed(6)) if rel_bias else None
    orders = {4: torch.tensor([2, 0, 1]), 6: torch.tensor([1, 2])}

    def run(state):
        outs, held, summed = [], [], []
        with torch.no_grad():
            for t in range(T):
                if t in orders:
                    state = F.reorder(state, orders[t], G)
                B = state["position"].numel()
                out, state = F.causal_step(*(x[:B, t] for x in xs), state, mask[:B, t], bias, chunk_size=G,
                                           relu2_norm="keys")
                outs.append(out)
                held.append(state["k_chunk"].shape[1])
                summed.append("kv_sum" in state)
        return outs, state, held, summed

    like = xs[-1]
    assert F.first_slots(G, like) == 1
    grown, grown_state, held, summed = run(F.empty_state(3, G, S, E, like))  # first_slots by default
    whole, whole_state, _, _ = run(F.empty_state(3, G, S, E, like, slots=G))
    for a, b in zip(grown, whole):
        assert_close(a, b)
    assert grown_state.keys() == whole_state.keys()
    for name, x in whole_state.items():  # the sum added up in another order
        assert torch.equal(grown_state[name], x) or name == "kv_sum", name
    assert_close(grown_state["kv_sum"], whole_state["kv_sum"])
    # each step holds the next power of two above the fullest fill it wrote (1, 2, 4, 4, 8, ...), then G for good;
    # rows 0 and 1 (the first kept at t = 6) complete a chunk at t = 7: the sum appears in the state of t = 8
    assert held[:5] == [1, 2, 4, 4, 8] and set(held[5:]) == {G}
    assert summed == [False] * 8 + [True] * (T - 8)
    monkeypatch.setattr(common, "reads_back_free", lambda x: False)
    assert F.first_slots(G, like) == G and "kv_sum" in F.empty_state(3, G, S, E, like)


def test_the_sum_of_a_state_without_one_is_that_of_its_rows_real_tokens():
    """with_sum: sum_j k'_j v_j^T over each row's first `position` slots; what lies past
    them (another row's tokens after a reorder) is not added; a sum kept is kept."""
    G, n = 8, 4
    g = torch.Generator().manual_seed(0)
    state = {"k_chunk": torch.randn(3, n, S, generator=g), "kl_chunk": torch.randn(3, n, S, generator=g),
             "v_chunk": torch.randn(3, n, E, generator=g), "position": torch.tensor([0, 2, 4])}
    summed = F.with_sum(state)["kv_sum"]
    for b, p in enumerate(state["position"].tolist()):
        want = sum((torch.outer(state["kl_chunk"][b, j], state["v_chunk"][b, j]) for j in range(p)),
                   torch.zeros(S, E))
        assert_close(summed[b], want)
    assert F.with_sum({**state, "kv_sum": summed})["kv_sum"] is summed


def test_quadratic_mode_is_one_big_chunk_without_linear_part():
    q, k, ql, kl, v = inputs(2, 9)
    out = F.quadratic(q, k, v, True, chunk_size=16, relu2_norm="chunk")
    ref = naive(q, k, torch.zeros_like(ql), kl, v, 64, causal=True) * 64 / 16
    assert_close(out, ref)


def test_rope_is_relative():
    """RoPE: q(m) . k(n) depends on m - n only."""
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(S, generator=g), torch.randn(S, generator=g)
    dot = lambda m, n: (F.rope(q, torch.tensor(m)) * F.rope(k, torch.tensor(n))).sum()  # noqa: E731
    assert torch.allclose(dot(5, 2), dot(13, 10), atol=1e-5)
    assert not torch.allclose(dot(5, 2), dot(5, 3), atol=1e-3)


def test_rope_turns_each_pair_by_its_angle():
    """rope against the rotation written out: (x1, x2) -> (x1 cos - x2 sin, x1 sin + x2 cos),
    angle = position * 10000^(-2i/s); low precision in, the same precision out."""
    g = torch.Generator().manual_seed(0)
    x, positions = torch.randn(2, 5, 3, S, generator=g), torch.arange(10).view(2, 5, 1) * 7
    angle = positions[..., None].float() * 10000.0 ** (-torch.arange(0, S, 2).float() / S)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    ref = torch.stack([x1 * angle.cos() - x2 * angle.sin(), x1 * angle.sin() + x2 * angle.cos()], -1).flatten(-2)
    assert_close(F.rope(x, positions), ref)
    half = F.rope(x.half(), positions)
    assert half.dtype == torch.float16 and torch.allclose(half.float(), ref, atol=2e-3)


def test_first_turns_are_rope_at_positions_from_zero():
    """The cached turns of positions 0 .. T-1 (kept at a power of two) rotate as rope does."""
    x = torch.randn(2, 37, 3, S, generator=torch.Generator().manual_seed(0))
    for T in (1, 2, 3, 37):
        assert_close(F.rotate(x[:, :T], F.first_turns(T, S, x.device).unsqueeze(-2)),
                     F.rope(x[:, :T], torch.arange(T).view(1, T, 1)))


def test_tables_first_built_in_inference_mode_serve_training():
    """The cached constants (chunk tables, RoPE's turns) built by a first call in
    inference mode (e.g. generation) are ordinary tensors: training afterwards can
    save them for backward. Sizes no other test uses, so this call builds them."""
    G, T, s = 7, 23, 6
    g = torch.Generator().manual_seed(0)

    def run():
        q, k, ql, kl = (torch.randn(2, T, s, generator=g, requires_grad=True) for _ in range(4))
        v = torch.randn(2, T, E, generator=g, requires_grad=True)
        q = F.rotate(q, F.first_turns(T, s, q.device))
        return sum(F.mixed_chunk(q, k, ql, kl, v, causal, chunk_size=G, relu2_norm=norm).sum()
                   for causal in (True, False) for norm in F.RELU2_NORMS)

    with torch.inference_mode():
        run()
    run().backward()


def test_a_step_off_the_cpu_reads_nothing_back_to_the_host():
    """Off the CPU a step reads every slot of the chunk and no value back to the
    host (on a GPU, no synchronization per step): steps across a chunk boundary,
    with a padded one and a relative bias, run on the meta device, which holds
    no values, so any read would raise. (__wrapped__: without own_precision,
    whose autocast query does not know the meta device.)"""
    G = 4
    q, k, ql, kl, v = (x.to("meta") for x in inputs(2, 2 * G + 1))
    bias = torch.zeros(2 * G - 1, device="meta")
    mask = torch.zeros(2, dtype=torch.bool, device="meta")
    state = F.empty_state(2, G, S, E, v)
    with torch.no_grad():
        for t in range(2 * G + 1):
            out, state = F.causal_step.__wrapped__(q[:, t], k[:, t], ql[:, t], kl[:, t], v[:, t], state,
                                                   mask if t == G else None, bias, chunk_size=G, relu2_norm="keys")
    assert out.shape == (2, E) and state["k_chunk"].shape == (2, G, S)
    with torch.no_grad():  # and beam search's reorder moves every slot, reading no fill back
        moved = F.reorder(state, torch.tensor([1, 0], device="meta"), G)
    assert moved["k_chunk"].shape == (2, G, S)


def matrix_products(fn) -> list:
    """(operator, tensor operands, output elements) of every matrix product fn() runs (forward and backward)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    found = []

    class Products(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            name = func.__name__.split(".")[0]
            if name in ("mm", "bmm", "baddbmm", "addmm"):
                found.append((name, [x for x in args if isinstance(x, torch.Tensor)], out.numel()))
            return out

    with Products():
        fn()
    return found


def product_sizes(fn) -> set:
    """Every size of every operand of the batched matrix products fn() runs."""
    return {n for name, operands, _ in matrix_products(fn) if name in ("bmm", "baddbmm") for x in operands
            for n in x.shape}


def test_a_cpu_step_multiplies_only_the_filled_slots():
    """On the CPU a step's products take the chunk's slots up to the fullest row's
    fill, this step's included: rows at fills 1 and 3 of G = 16 take 4 slots."""
    G = 16
    xs = inputs(2, 4)
    mask = torch.zeros(2, 4, dtype=torch.bool)
    mask[0, :2] = True
    with torch.no_grad():
        _, state = recurrent(*(x[:, :3] for x in xs), G, mask[:, :3])
        sizes = product_sizes(lambda: F.causal_step(*(x[:, 3] for x in xs), state, chunk_size=G, relu2_norm="keys"))
    assert F.buffered(state, G).tolist() == [1, 3]
    assert 4 in sizes and G not in sizes, sizes
    with torch.no_grad():  # no rows: nothing to read
        out, _ = F.causal_step(*(x[:0, 3] for x in xs), F.empty_state(0, G, S, E, xs[-1]), chunk_size=G,
                               relu2_norm="keys")
    assert out.shape == (0, E)


@pytest.mark.parametrize("rel_bias", [False, True], ids=["", "rel-bias"])
def test_reading_every_slot_gives_the_same_steps(monkeypatch, rel_bias):
    """The CPU's steps (the filled slots) and the GPU's (every slot) agree, with
    padding, a relative bias, and a reorder that leaves other rows' tokens in
    the slots past a row's fill."""
    G, T, t0 = 8, 20, 11
    order = torch.tensor([1, 1, 0])
    xs = inputs(3, T, seed=3)
    mask = torch.zeros(3, T, dtype=torch.bool)
    mask[0, :5] = True
    bias = torch.randn(2 * G - 1, generator=torch.Generator().manual_seed(4)) if rel_bias else None

    def run():
        with torch.no_grad():
            first, state = recurrent(*(x[:, :t0] for x in xs), G, mask[:, :t0], bias, "keys")
            state = F.reorder(state, order, G)
            later, _ = recurrent(*(x[:, t0:] for x in xs), G, None, bias, "keys", state)
        return first, later

    filled = run()
    monkeypatch.setattr(F, "slots_read", lambda filled, G: G)
    for got, want in zip(run(), filled):
        assert_close(got, want)


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 2e-2), (torch.float16, 4e-3)], ids=["bf16", "fp16"])
def test_half_precision_at_4096_follows_fp32_with_gradients(dtype, tol):
    """bf16 / fp16 inputs at T=4096, G=256 (the chunked form multiplies them as they are):
    output and gradients finite, within `tol` (relative to their scale) of fp32's."""
    xs = [x.requires_grad_() for x in inputs(1, 4096, seed=3)]
    halves = [x.detach().to(dtype).requires_grad_() for x in xs]
    w = torch.randn(1, 4096, E, generator=torch.Generator().manual_seed(4))
    ref = mixed_chunk(*xs, 256, causal=True, relu2_norm="keys")
    out = mixed_chunk(*halves, 256, causal=True, relu2_norm="keys")
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert_close(out.float(), ref, rtol=tol)
    for got, want in zip(grads(out.float(), w, halves), grads(ref, w, xs)):
        assert torch.isfinite(got).all()
        assert_close(got.float(), want, rtol=tol)


def matmul_flops(fn) -> dict:
    """dtype -> the floating-point operations of the matrix products fn() runs (forward and backward)."""
    flops = {}
    for _, operands, elements in matrix_products(fn):
        a = operands[-2]
        flops[a.dtype] = flops.get(a.dtype, 0) + 2 * elements * a.shape[-1]
    return flops


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("padded", [False, True], ids=["full", "padded"])
def test_half_inputs_are_multiplied_in_half_precision(dtype, padded):
    """The chunked form's products that grow with T G (scores, weights times values,
    k'v^T, q' times the sums), forward and backward, take half-precision operands
    (tensor cores on a GPU); only the (N, N) weighting of the chunks' sums runs in float32."""
    B, T, G = 2, 1024, 128
    xs = [x.to(dtype).requires_grad_() for x in inputs(B, T, seed=5)]
    mask = torch.zeros(B, T, dtype=torch.bool)
    if padded:
        mask[1, :100] = True
    flops = matmul_flops(lambda: mixed_chunk(*xs, G, causal=True, padding_mask=mask if padded else None,
                                             rel_bias=torch.zeros(2 * G - 1), relu2_norm="keys").float().sum().backward())
    assert flops.get(dtype, 0) > 0 and set(flops) <= {dtype, torch.float32}
    assert flops.get(torch.float32, 0) < 0.05 * flops[dtype], flops


def test_fp16_keeps_a_large_score_whose_weight_fits():
    """relu(score)^2 / c is formed as relu(score / sqrt(c))^2: a score of 300 (its square
    overflows float16) with c = G = 256 gives a weight of about 352, which float16 holds."""
    B, T, G = 1, 256, 256
    q = torch.full((B, T, S), 300 ** 0.5 * S ** -0.25)  # q . k / sqrt(S) = 300 for every pair
    k, ql, kl = q.clone(), torch.zeros(B, T, S), torch.zeros(B, T, S)
    v = torch.randn(B, T, E, generator=torch.Generator().manual_seed(6)) * 0.01
    ref = mixed_chunk(q, k, ql, kl, v, G, causal=True, relu2_norm="chunk")
    out = mixed_chunk(*(x.half() for x in (q, k, ql, kl, v)), G, causal=True, relu2_norm="chunk")
    assert torch.isfinite(out).all()
    assert_close(out.float(), ref, rtol=4e-3)


def heads_then_mixed_chunk(z, gamma, beta, v, causal, rope, G, norm):
    """from_z's function composed of the forms autograd differentiates: the offset-scales, RoPE, mixed_chunk."""
    qk = torch.addcmul(beta, z.unsqueeze(-2), gamma)
    if rope:
        qk = F.rotate(qk, F.first_turns(z.shape[1], z.shape[-1], z.device).unsqueeze(-2))
    return F.mixed_chunk(*qk.unbind(-2), v, causal, None, None, chunk_size=G, relu2_norm=norm)


def z_inputs(B, T, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g, dtype=dtype).requires_grad_() for shape in
            ((B, T, S), (4, S), (4, S), (B, T, E))]


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("rope", [True, False], ids=["rope", "no-rope"])
@pytest.mark.parametrize("norm", F.RELU2_NORMS)
@pytest.mark.parametrize("B,T,G", [(2, 12, 4), (1, 6, 8), (2, 16, 16)], ids=["3-chunks", "shorter-than-G", "1-chunk"])
def test_from_z_equals_the_composition_with_gradients(causal, rope, norm, B, T, G):
    """from_z's written-out backward: output and the gradients of Z, gamma, beta and V
    equal autograd's through the offset-scales, RoPE and mixed_chunk (RoPE turns in float32)."""
    xs = z_inputs(B, T, seed=T + G)
    w = torch.randn(B, T, E, generator=torch.Generator().manual_seed(1))
    out = F.from_z(*xs, causal, rope, chunk_size=G, relu2_norm=norm)
    ref = heads_then_mixed_chunk(*xs, causal, rope, G, norm)
    assert_close(out, ref)
    for got, want in zip(grads(out, w, xs), grads(ref, w, xs)):
        assert_close(got, want)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_from_z_backward_passes_gradcheck(causal):
    """In float64 without RoPE (whose turns are float32), from_z's backward is the
    derivative of its forward (finite differences)."""
    xs = z_inputs(2, 8, seed=2, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda *a: F.from_z(*a, causal, False, chunk_size=4, relu2_norm="keys"), xs)


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 3e-2), (torch.float16, 5e-3)], ids=["bf16", "fp16"])
def test_from_z_in_half_precision_follows_fp32(dtype, tol):
    xs = z_inputs(2, 512, seed=7)
    halves = [x.detach().to(dtype).requires_grad_() for x in xs]
    w = torch.randn(2, 512, E, generator=torch.Generator().manual_seed(8))
    ref = F.from_z(*xs, True, True, chunk_size=128, relu2_norm="keys")
    out = F.from_z(*halves, True, True, chunk_size=128, relu2_norm="keys")
    assert out.dtype == dtype
    assert_close(out.float(), ref, rtol=tol)
    for got, want, x in zip(grads(out.float(), w, halves), grads(ref, w, xs), halves):
        assert got.dtype == dtype and torch.isfinite(got).all()
        assert_close(got.float(), want, rtol=tol)


def test_from_z_computes_what_it_admits():
    none = torch.zeros(2, 8, dtype=torch.bool)
    right, left = none.clone(), none.clone()
    right[0, 6:], left[0, :2] = True, True
    for causal in (True, False):
        assert F.from_z_computes(8, 4, causal, None, None) and F.from_z_computes(8, 4, causal, none, None)
        assert F.from_z_computes(3, 4, causal, None, None)  # shorter than G: one chunk
        assert not F.from_z_computes(8, 4, causal, left, None)  # left padding: mixed_chunk moves real tokens first
        assert not F.from_z_computes(8, 4, causal, None, torch.zeros(7))  # a relative position bias
    assert F.from_z_computes(8, 4, True, right, None) and F.from_z_computes(10, 4, True, None, None)
    assert not F.from_z_computes(8, 4, False, right, None)  # non-causal over chunks: mixed_chunk moves real tokens first
    assert not F.from_z_computes(10, 4, False, None, None)  # non-causal: a partial chunk
    assert F.from_z_computes(8, 8, False, left, None) and F.from_z_computes(8, 8, False, right, None)  # one chunk
    assert not F.from_z_computes(8, 8, True, left, None)
    with pytest.raises(ValueError, match="from_z: T=10 is not a whole number of chunks of 4"):
        F.from_z(*z_inputs(1, 10, seed=0), False, True, chunk_size=4, relu2_norm="keys")


@pytest.mark.parametrize("norm", F.RELU2_NORMS)
@pytest.mark.parametrize("T,G", [(10, 4), (13, 4), (7, 8)], ids=["partial-chunk", "1-token-chunk", "shorter-than-G"])
def test_causal_from_z_pads_whole_chunks_and_ignores_right_padding(norm, T, G):
    """Causal: from_z over a length that is not a whole number of chunks, and over rows
    padded at their ends, gives mixed_chunk's outputs and gradients at every real token
    (a loss that ignores the padded ones, as fairseq's does)."""
    B = 3
    mask = torch.zeros(B, T, dtype=torch.bool)
    mask[1, T - 3:], mask[2, 1:] = True, True
    xs = z_inputs(B, T, seed=T)
    w = torch.randn(B, T, E, generator=torch.Generator().manual_seed(2)).masked_fill(mask[..., None], 0.0)
    out = F.from_z(*xs, True, True, chunk_size=G, relu2_norm=norm)
    qk = F.rotate(torch.addcmul(xs[2], xs[0].unsqueeze(-2), xs[1]), F.first_turns(T, S, xs[0].device).unsqueeze(-2))
    ref = F.mixed_chunk(*qk.unbind(-2), xs[3], True, mask, None, chunk_size=G, relu2_norm=norm)
    assert out.shape == ref.shape
    assert_close(out[~mask], ref[~mask])
    for got, want in zip(grads(out, w, xs), grads(ref, w, xs)):
        assert_close(got, want)


@pytest.mark.parametrize("norm", F.RELU2_NORMS)
@pytest.mark.parametrize("rope", [True, False], ids=["rope", "no-rope"])
@pytest.mark.parametrize("T,G", [(7, 8), (8, 8)], ids=["shorter-than-G", "one-chunk"])
def test_noncausal_from_z_masks_padded_keys_in_one_chunk(norm, rope, T, G):
    """Non-causal over one chunk (an encoder's sentence, T <= G) with padding on the
    left, on the right and none: from_z gives the GAU's composition (RoPE at the real
    positions, then mixed_chunk with the mask) at every real token, and the same
    gradients through a loss that ignores the padded outputs."""
    B = 3
    mask = torch.zeros(B, T, dtype=torch.bool)
    mask[0, :3], mask[1, T - 2:] = True, True
    xs = z_inputs(B, T, seed=T + 5)
    w = torch.randn(B, T, E, generator=torch.Generator().manual_seed(3)).masked_fill(mask[..., None], 0.0)
    out = F.from_z(*xs, False, rope, mask, chunk_size=G, relu2_norm=norm)
    qk = torch.addcmul(xs[2], xs[0].unsqueeze(-2), xs[1])
    if rope:
        qk = F.rope(qk, F.real_positions(mask, B, T, qk.device).unsqueeze(-1))
    ref = F.mixed_chunk(*qk.unbind(-2), xs[3], False, mask, None, chunk_size=G, relu2_norm=norm)
    assert_close(out[~mask], ref[~mask])
    for got, want in zip(grads(out, w, xs), grads(ref, w, xs)):
        assert_close(got, want)
    with pytest.raises(ValueError, match="from_z: a causal row is padded at its end and takes no padding mask"):
        F.from_z(*xs, True, rope, mask, chunk_size=G, relu2_norm=norm)


def test_scale_norm_backward_is_its_derivative_and_autograds():
    """scale_norm's written-out backward: finite differences agree (float64), and so does
    autograd through x / max(|x|, eps) * g, with a zero row and a row below eps (clamped)."""
    x = torch.randn(3, 5, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    x[0, 0], x[1, 1] = 0.0, x[1, 1] * 1e-7
    x.requires_grad_()
    g = torch.tensor(4.0, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: F.scale_norm(a, b, 1e-5), (x, g))
    w = torch.randn(3, 5, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(10))
    ref = x / x.norm(dim=-1, keepdim=True).clamp(min=1e-5) * g
    out = F.scale_norm(x, g, 1e-5)
    assert_close(out, ref, rtol=1e-12)
    for got, want in zip(torch.autograd.grad((out * w).sum(), (x, g)), torch.autograd.grad((ref * w).sum(), (x, g))):
        assert_close(got, want, rtol=1e-9)
    with torch.no_grad():  # decoding: the same values, without the autograd function
        assert_close(F.scale_norm(x, g, 1e-5), ref, rtol=1e-12)
    assert F.scale_norm(x.detach(), g.detach(), 1e-5).grad_fn is None
    assert type(F.scale_norm(x.detach(), g, 1e-5).grad_fn).__name__ == "_ScaleNormBackward"


def test_invalid_chunk_size_is_named():
    with pytest.raises(ValueError, match="chunk_size must be a positive integer, got 0"):
        mixed_chunk(*inputs(1, 4), 0, causal=True)


KERNEL_CASES = {  # T, G, s, e, rope, relu2_norm
    "3-chunks": (40, 16, 32, 48, True, "keys"),
    "no-rope": (40, 16, 32, 48, False, "chunk"),
    "shorter-than-G": (12, 16, 32, 20, True, "none"),
    "1-token-chunks": (5, 1, 32, 20, True, "keys"),
    "3-blocks-a-chunk": (45, 40, 40, 40, True, "keys"),  # s/2 = 20 and e = 40: blocks filled in part
    "value-tiles": (20, 16, 16, 144, True, "chunk"),  # e = 144: whole and part tiles of BLOCK_V and BLOCK_DV
}
HALF_CASES = ("3-chunks", "3-blocks-a-chunk")


def gated_from_z(x, gamma, beta, rope, e, G, norm):
    """The unit between its projections as the torch path computes it: SiLU, split, from_z, times U."""
    u, v, z = torch.nn.functional.silu(x).split((e, e, x.shape[-1] - 2 * e), dim=-1)
    return u * F.from_z(z, gamma, beta, v, True, rope, chunk_size=G, relu2_norm=norm)


BLOCKS = (16, 32)  # the tokens a program takes at a time in ops.mixed_chunk_triton.TILES


@pytest.mark.parametrize("case,dtype,block", [
    pytest.param(case, dtype, block, id=f"{case}-{str(dtype)[6:]}-{block}") for block in BLOCKS for case, dtype in
    [(case, torch.float32) for case in KERNEL_CASES]
    + [(case, half) for case in HALF_CASES for half in (torch.bfloat16, torch.float16)]])
def test_mixed_chunk_kernels_equal_the_torch_unit_with_gradients(triton_device, case, dtype, block):
    """The causal unit between its projections on the training kernels
    (ops.mixed_chunk_triton.gated: SiLU(U) times mixed chunk attention) against
    SiLU, from_z and the gate in torch: the output and the gradients of X = [U, V, Z],
    gamma and beta, with a partial last chunk, RoPE on and off, every relu^2
    normalization, chunks longer and shorter than a kernel's block of tokens, widths
    not a whole number of blocks; half inputs against float32 to a few of their eps
    (float16 with its products' operands in float16; bfloat16's multiply in float32
    under Triton's interpreter), each result in its input's dtype; with each size of
    block a GPU may choose (TILES; their warps, which the interpreter runs as one
    thread, aside)."""
    from linear_fairseq.ops import mixed_chunk_triton

    assert sorted({t.BLOCK_T for t in mixed_chunk_triton.TILES}) == list(BLOCKS)
    tiles = next(t for t in mixed_chunk_triton.TILES if t.BLOCK_T == block)

    T, G, s, e, rope, norm = KERNEL_CASES[case]
    g = torch.Generator().manual_seed(T)
    xs = [torch.randn(*shape, generator=g) for shape in ((2, T, 2 * e + s), (4, s), (4, s))]
    xs[1] = 1 + 0.3 * xs[1]
    w = torch.randn(2, T, e, generator=g)
    ref_in = [x.clone().requires_grad_() for x in xs]
    ref = gated_from_z(*ref_in, rope, e, G, norm)
    ref_grads = grads(ref, w, ref_in)
    kernel_in = [(x.to(dtype) if i == 0 else x).to(triton_device).requires_grad_() for i, x in enumerate(xs)]
    out = mixed_chunk_triton.gated(*kernel_in, rope, e=e, chunk_size=G, relu2_norm=norm, tiles=tiles)
    assert out.dtype == dtype and out.shape == ref.shape
    got_grads = grads(out.float(), w.to(triton_device), kernel_in)
    rtol = RTOL if dtype == torch.float32 else 4 * torch.finfo(dtype).eps
    assert_close(out.float().cpu(), ref, rtol=rtol)
    for got, want, x in zip(got_grads, ref_grads, kernel_in):
        assert got.dtype == x.dtype
        assert_close(got.float().cpu(), want, rtol=rtol)


def test_mixed_chunk_kernels_take_more_programs_not_longer_ones_as_t_grows(triton_device, monkeypatch):
    """Every launch of the training kernels (forward and backward) has programs in
    proportion to the chunks: twice the tokens, twice the programs, each one's work
    one chunk's (a kernel that walked the sequence would keep its programs and
    lengthen each); the chunks' sums are cumulated between launches, and the
    result over four chunks is the torch unit's."""
    from linear_fairseq.ops import mixed_chunk_triton as M

    kernels = ("_chunk_sums_kernel", "_forward_kernel", "_chunk_grads_kernel", "_queries_kernel", "_keys_kernel")
    grids = []

    class Recorded:
        def __init__(self, name, kernel):
            self.name, self.kernel = name, kernel

        def __getitem__(self, grid):
            grids.append((self.name, grid))
            return self.kernel[grid]

    for name in kernels:
        monkeypatch.setattr(M, name, Recorded(name, getattr(M, name)))
    G, s, e = 16, 32, 48
    programs = {}
    for N in (2, 4):
        g = torch.Generator().manual_seed(N)
        xs = [torch.randn(*shape, generator=g) for shape in ((1, N * G, 2 * e + s), (4, s), (4, s))]
        kernel_in = [x.to(triton_device).requires_grad_() for x in xs]
        grids.clear()
        out = M.gated(*kernel_in, True, e=e, chunk_size=G, relu2_norm="keys")
        got_grads = grads(out, torch.ones_like(out), kernel_in)
        programs[N] = {name: math.prod(grid) for name, grid in grids}
        assert sorted(programs[N]) == sorted(kernels)
    assert all(programs[4][name] == 2 * programs[2][name] for name in kernels), programs
    ref_in = [x.detach().clone().cpu().requires_grad_() for x in kernel_in]
    ref = gated_from_z(*ref_in, True, e, G, "keys")
    assert_close(out.detach().cpu(), ref.detach())
    for got, want in zip(got_grads, grads(ref, torch.ones_like(ref), ref_in)):
        assert_close(got.cpu(), want)
