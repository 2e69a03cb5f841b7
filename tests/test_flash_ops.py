"""FLASH mixed chunk attention math: reference == chunked == recurrent
(outputs and gradients), chunk boundaries, padding on either side, and
low precision."""
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


def recurrent(q, k, ql, kl, v, G, padding_mask=None, rel_bias=None, relu2_norm="chunk"):
    state = F.empty_state(q.shape[0], G, S, E, v)
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
    in the training form and in decoding alike."""
    G, T = 4, 12
    xs = list(inputs(1, T))
    xs[3] = xs[3].clone()
    for form in (lambda *a: mixed_chunk(*a, G, causal=True), lambda *a: recurrent(*a, G)[0]):
        base = form(*xs)
        moved = list(xs)
        moved[3] = xs[3].clone()
        moved[3][:, 5] += 3.0
        changed = (form(*moved) - base).abs().amax(-1)[0] > 1e-6
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
    G = 8
    sizes = []
    for T in (5, 200):
        _, state = recurrent(*inputs(2, T), G)
        sizes.append(sum(t.numel() for t in state.values()))
    assert sizes[0] == sizes[1]


@pytest.mark.parametrize("t0", [3, 11], ids=["inside-the-first-chunk", "after-a-chunk"])
@pytest.mark.parametrize("order", [[1, 1, 0, 3], [3, 0]], ids=["same-batch", "batch-shrinks"])
def test_reorder_continues_each_rows_new_prefix(t0, order):
    """After reorder, row i continues the prefix of row order[i] exactly as the
    reference over the spliced sequences does; an order that keeps the batch
    size reuses the chunk buffers."""
    G, T = 8, 20
    order = torch.tensor(order)
    first, later = inputs(4, T, seed=1), inputs(4, T, seed=2)
    spliced = [torch.cat([a[order, :t0], b[: len(order), t0:]], dim=1) for a, b in zip(first, later)]
    with torch.no_grad():
        _, state = recurrent(*(x[:, :t0] for x in first), G)
        moved = F.reorder(state, order)
        assert (moved["k_chunk"] is state["k_chunk"]) == (len(order) == 4)
        outs = []
        for t in range(t0, T):
            out, moved = F.causal_step(*(x[:, t] for x in spliced), moved, chunk_size=G, relu2_norm="chunk")
            outs.append(out)
    assert_close(torch.stack(outs, dim=1), naive(*spliced, G, True)[:, t0:])


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


def test_decoding_steps_read_nothing_back_to_the_host():
    """A step that completes a chunk moves its sum with a masked add: no value is
    read back to the host (on a GPU, no synchronization per step)."""
    G = 4
    xs = inputs(2, 2 * G + 1)
    mask = torch.zeros(2, dtype=torch.bool)
    mask[1] = True
    with torch.no_grad():
        _, state = recurrent(*(x[:, : G - 1] for x in xs), G)
        with torch.profiler.profile() as prof:
            for t in range(G - 1, 2 * G):
                _, state = F.causal_step(*(x[:, t] for x in xs), state, mask if t == G else None,
                                         chunk_size=G, relu2_norm="keys")
    reads = [e.name for e in prof.events() if e.name in ("aten::item", "aten::_local_scalar_dense")]
    assert not reads and F.fill_and_done(state["position"], G)[1].tolist() == [2 * G, G]


def test_bf16_at_4096_is_finite_and_close():
    """bf16 inputs at T=4096, G=256: finite, within 2e-2 (relative to the output scale) of fp32."""
    xs = inputs(1, 4096, seed=3)
    ref = mixed_chunk(*xs, 256, causal=True)
    out = mixed_chunk(*(x.bfloat16() for x in xs), 256, causal=True)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert_close(out.float(), ref, rtol=2e-2)


def test_invalid_chunk_size_is_named():
    with pytest.raises(ValueError, match="chunk_size must be a positive integer, got 0"):
        mixed_chunk(*inputs(1, 4), 0, causal=True)
