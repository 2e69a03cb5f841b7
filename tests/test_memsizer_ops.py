"""MemSizer math: the quadratic reference, the chunked training form and the
recurrent decoding form are the same function (outputs and gradients)."""
import pytest
import torch

from linear_fairseq.ops import memsizer as M

RTOL = 1e-5  # fp32, relative to the output's scale


def inputs(B, T, k, d, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, 3, k, generator=g, dtype=dtype)
    p = M.slot_weights(logits).to(dtype)
    K = torch.randn(B, T, k, generator=g, dtype=dtype)
    V = torch.randn(B, T, d, generator=g, dtype=dtype)
    return p, K, V


def assert_close(actual, expected, rtol=RTOL):
    scale = expected.abs().max().clamp(min=1.0)
    err = (actual - expected).abs().max()
    assert err <= rtol * scale, f"max abs error {err:.3g} > {rtol:g} x {scale:.3g}"


def recurrent(p, K, V, padding_mask=None):
    state, outs = None, []
    for t in range(p.shape[1]):
        mask_t = None if padding_mask is None else padding_mask[:, t]
        out, state = M.causal_step(p[:, t], K[:, t], V[:, t], state, mask_t)
        outs.append(out)
    return torch.stack(outs, dim=1), state["S"], state["n"]


def grads(fn, *xs):
    xs = [x.detach().requires_grad_() for x in xs]
    out = fn(*xs)
    w = torch.randn_like(out, generator=torch.Generator().manual_seed(1))
    return out, torch.autograd.grad((out * w).sum(), xs)


@pytest.mark.parametrize("T", [1, 7, 300, 333])
@pytest.mark.parametrize("k,chunk", [(1, 64), (4, 5), (32, 64), (4, 1)])
def test_causal_chunked_matches_naive(T, k, chunk):
    p, K, V = inputs(2, T, k, 16)
    ref, ref_grads = grads(lambda p, K, V: M.naive(p, K, V, causal=True), p, K, V)
    out, out_grads = grads(lambda p, K, V: M.causal_chunked(p, K, V, chunk_size=chunk), p, K, V)
    assert_close(out, ref)
    for g, g_ref in zip(out_grads, ref_grads):
        assert_close(g, g_ref)


@pytest.mark.parametrize("T", [1, 7, 300])
@pytest.mark.parametrize("k", [1, 4, 32])
def test_recurrent_matches_naive_with_gradients(T, k):
    p, K, V = inputs(2, T, k, 8)
    ref, ref_grads = grads(lambda p, K, V: M.naive(p, K, V, causal=True), p, K, V)
    out, out_grads = grads(lambda p, K, V: recurrent(p, K, V)[0], p, K, V)
    assert_close(out, ref)
    for g, g_ref in zip(out_grads, ref_grads):
        assert_close(g, g_ref)


def test_step_averages_per_head_probabilities_as_given_their_mean():
    """causal_step takes each head's slot probabilities (B, H, k) and averages them
    itself (one batched product with the 1/sqrt(i) scale): the same outputs,
    gradients and state as with their mean, also across a padded first step
    (n = 0 there: the output is finite, not 0/0)."""
    g = torch.Generator().manual_seed(3)
    probs = M.slot_probs(torch.randn(2, 6, 3, 4, generator=g))
    K, V = torch.randn(2, 6, 4, generator=g), torch.randn(2, 6, 5, generator=g)
    mask = torch.zeros(2, 6, dtype=torch.bool)
    mask[0, :2] = True

    def run(probs, K, V, per_head):
        p = probs if per_head else probs.mean(dim=-2)
        out, S, n = recurrent(p, K, V, mask)
        return torch.cat([out.flatten(), S.flatten(), n])

    ref, ref_grads = grads(lambda *x: run(*x, per_head=False), probs, K, V)
    out, out_grads = grads(lambda *x: run(*x, per_head=True), probs, K, V)
    assert torch.isfinite(out).all()
    assert_close(out, ref)
    for g_out, g_ref in zip(out_grads, ref_grads):
        assert_close(g_out, g_ref)


def test_recurrent_state_is_the_unscaled_memory():
    p, K, V = inputs(2, 9, 4, 8)
    _, S, n = recurrent(p, K, V)
    assert S.shape == (2, 4, 8) and S.dtype == torch.float32
    assert torch.allclose(S, K.transpose(1, 2) @ V, atol=1e-5)
    assert n.tolist() == [9.0, 9.0]


def test_noncausal_matches_naive():
    p, K, V = inputs(3, 11, 8, 16)
    q = p[:, :5]  # queries need not be the source
    S = M.source_memory(K, V)
    assert_close(M.read_memory(q, S, q.dtype), M.naive(q, K, V, causal=False))


def test_chunked_gradcheck_float64():
    p, K, V = inputs(1, 6, 3, 4, dtype=torch.float64)
    fn = lambda p, K, V: M.causal_chunked(p, K, V, chunk_size=4)  # noqa: E731
    assert torch.autograd.gradcheck(fn, [x.requires_grad_() for x in (p, K, V)])


def left_pad(x, pad, fill):
    return torch.cat([torch.full((x.shape[0], pad, x.shape[2]), fill, dtype=x.dtype), x], dim=1)


@pytest.mark.parametrize("causal", [True, False])
def test_left_padding_leaves_real_positions_unchanged(causal):
    T, pad = 13, 4
    p, K, V = inputs(1, T, 4, 8)
    # garbage (not zeros) at the padded positions
    pp, Kp, Vp = left_pad(p, pad, 0.3), left_pad(K, pad, 5.0), left_pad(V, pad, -7.0)
    mask = torch.zeros(1, T + pad, dtype=torch.bool)
    mask[:, :pad] = True
    if causal:
        ref = M.naive(p, K, V, causal=True)
        for out in (
            M.naive(pp, Kp, Vp, causal=True, padding_mask=mask),
            M.causal_chunked(pp, Kp, Vp, mask, chunk_size=5),
            recurrent(pp, Kp, Vp, mask)[0],
        ):
            assert_close(out[:, pad:], ref)
    else:
        ref = M.read_memory(p, M.source_memory(K, V), p.dtype)
        out = M.read_memory(p, M.source_memory(Kp, Vp, mask), p.dtype)
        assert_close(out, ref)
        assert_close(M.naive(p, Kp, Vp, causal=False, padding_mask=mask), ref)


def test_right_padding_in_a_batch_matches_each_sequence_alone():
    p, K, V = inputs(2, 10, 4, 8)
    mask = torch.zeros(2, 10, dtype=torch.bool)
    mask[1, 6:] = True
    out = M.causal_chunked(p, K, V, mask, chunk_size=3)
    alone = M.naive(p[1:, :6], K[1:, :6], V[1:, :6], causal=True)
    assert_close(out[1:, :6], alone)


def test_bf16_inputs_accumulate_in_fp32():
    p, K, V = inputs(1, 512, 4, 16)
    ref = M.causal_chunked(p, K, V, chunk_size=64)
    out = M.causal_chunked(p.bfloat16(), K.bfloat16(), V.bfloat16(), chunk_size=64)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert_close(out.float(), ref, rtol=2e-2)


def test_invalid_chunk_size_is_named():
    p, K, V = inputs(1, 4, 2, 4)
    with pytest.raises(ValueError, match="chunk_size must be a positive integer, got 0"):
        M.causal_chunked(p, K, V, chunk_size=0)


@pytest.mark.parametrize("training", [True, False])
def test_module_step_drops_out_the_heads_mean_in_training(training):
    """The module's step hands the op each head's probabilities, except where
    attention dropout acts (training): dropout then applies to their mean, as
    in the parallel forms."""
    from linear_fairseq.modules.memsizer_attention import MemsizerAttention

    attn = MemsizerAttention(16, 2, memory_size=4, q_init_scale=1.0, kv_init_scale=1.0, memsizer_chunk_size=4,
                             attention_dropout=0.5, causal=True).train(training)
    x = torch.randn(3, 16, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(1)
    out, _ = attn.step(x, {}, None)
    torch.manual_seed(1)
    logits, k, v = attn.project(x, "pkv")
    expected, _ = M.causal_step(attn.slot_weights(logits), *attn.keys_values(k, v))
    assert_close(out, expected)


@pytest.mark.parametrize("padded", [True, False])
@pytest.mark.parametrize("dtype,rtol", [(torch.float32, RTOL), (torch.float16, 2e-3)])
@pytest.mark.parametrize("k,d", [(4, 16), (5, 300)])  # 300: several blocks of value columns, none a power of 2
def test_triton_step_equals_the_norms_and_the_torch_step(triton_device, padded, dtype, rtol, k, d):
    """MemSizer's decoding step on its Triton kernel (ops.memsizer_triton; on CUDA, or
    on CPU through Triton's interpreter), from the projections, writes what the
    module's norms, slot_probs and the torch step give, and the same state (S, n),
    at every step: affine norms, a row whose first steps are padding, the three
    inputs as strided views of one projection, beams reordered halfway."""
    from torch import nn

    from linear_fairseq.ops import memsizer_triton

    g = torch.Generator().manual_seed(k)
    B, H, T = 2, 3, 8
    norms = [nn.LayerNorm(k), nn.LayerNorm(d)]
    with torch.no_grad():
        for param in (param for norm in norms for param in norm.parameters()):
            param.copy_(torch.randn(param.shape, generator=g))
    k_norm, v_norm = (norm.to(triton_device, dtype) for norm in norms)
    projected = (torch.randn(B, T, H * k + k + d, generator=g) * 2 + 0.5).to(dtype)  # one projection's columns
    logits, K_pre, V_pre = projected.split([H * k, k, d], dim=-1)
    logits = logits.unflatten(-1, (H, k))
    mask = torch.zeros(B, T, dtype=torch.bool)
    mask[1, :3] = True
    states = [None, None]
    with torch.no_grad():
        for t in range(T):
            at = lambda x: x[:, t].to(triton_device)  # noqa: E731
            step_mask = at(mask) if padded else None
            if t == T // 2:
                order = torch.arange(B - 1, -1, -1, device=triton_device)
                states = [{key: x.index_select(0, order) for key, x in state.items()} for state in states]
            out, states[0] = M.causal_step(M.slot_probs(at(logits)), k_norm(at(K_pre)), v_norm(at(V_pre)), states[0],
                                           step_mask)
            theirs, states[1] = memsizer_triton.causal_step(at(logits), at(K_pre), at(V_pre), k_norm, v_norm,
                                                            states[1], step_mask)
            assert theirs.dtype == dtype
            assert_close(theirs.float().cpu(), out.float().cpu(), rtol)
            assert_close(states[1]["S"].cpu(), states[0]["S"].cpu(), rtol)
            assert torch.equal(states[1]["n"].cpu(), states[0]["n"].cpu())
    if padded:
        assert states[0]["n"].tolist() == [T - 3, T]  # the rows swapped halfway


def test_memsizer_backend_triton_off_cuda_is_one_line_naming_why():
    """--memsizer-backend triton where the kernel cannot run: one line naming why and
    the way out; auto decodes on the torch step there."""
    from linear_fairseq.errors import ConfigError
    from linear_fairseq.modules.memsizer_attention import MemsizerAttention

    options = dict(memory_size=4, q_init_scale=1.0, kv_init_scale=1.0, memsizer_chunk_size=4, causal=True)
    x = torch.randn(2, 16)
    with pytest.raises(ConfigError) as err, torch.no_grad():
        MemsizerAttention(16, 2, memsizer_backend="triton", **options).eval().step(x, {}, None)
    message = str(err.value)
    assert "\n" not in message and message.startswith("--memsizer-backend triton: the model runs on cpu, not CUDA")
    assert "--memsizer-backend auto" in message
    assert not MemsizerAttention(16, 2, memsizer_backend="auto", **options).runs_on_triton(x)
