"""Kernel attention math: reference == chunked loop == chunkwise parallel ==
recurrent for every feature map (outputs, gradients and final state), padding,
the causal stabilizer never looking ahead, long-sequence / low-precision
behaviour, and a parallel form whose number of kernels does not grow with T."""
import math

import pytest
import torch

from benchmarks.op_counts import count
from benchmarks.ops_cases.performer import features
from linear_fairseq.ops import performer as K
from linear_fairseq.ops import performer_fla

RTOL = 1e-5
B, H, D = 2, 2, 8


def assert_close(actual, expected, rtol=RTOL):
    scale = expected.abs().max().clamp(min=1.0)
    err = (actual - expected).abs().max()
    assert err <= rtol * scale, f"max abs error {err:.3g} > {rtol:g} x {scale:.3g}"


def qkv(T, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, T, D, generator=g, dtype=dtype) for _ in range(3)]


def featurize(name, q, k, seed=0, m=16):
    """phi_q, phi_k, key log-scale, query log-scale for a named feature map (fixed random draws;
    rfa with enough features for a positive normalizer, t2r with its paper's 32)."""
    return features(name, q, k, {"rfa": 256, "t2r": 32}.get(name, m), torch.Generator().manual_seed(seed + 100))


def simple_gla_written_out(q, k, v, g=None, scale=1.0):
    """fla-core's chunk_simple_gla as its docs define it, on (B, T, H, .) tensors:
    o_i = scale sum_{j<=i} exp(G_i - G_j) q_i . k_j v_j, G the prefix sum of g (B, T, H)."""
    q, k, v = (x.transpose(1, 2).double() for x in (q, k, v))
    T = q.shape[2]
    G = q.new_zeros(q.shape[:3]) if g is None else g.transpose(1, 2).double().cumsum(-1)
    later = ~torch.ones(T, T, dtype=torch.bool).tril()
    decay = (G[..., :, None] - G[..., None, :]).masked_fill(later, float("-inf")).exp()
    return ((q @ k.transpose(-1, -2)) * scale * decay @ v).transpose(1, 2).float(), None


MAPS = ["elu", "favor", "rfa", "t2r"]
PARALLEL = {"chunked": K.causal_chunked, "parallel": K.causal_parallel}  # the forms over a whole sequence
# fla: ops.performer_fla's mapping onto fla-core's kernel, here with the kernel written out
FORMS = ["naive", *PARALLEL, "step", "fla"]


def run(form, name, q, k, v, gate=None, mask=None, chunk=5, eps=1e-6):
    pq, pk, s, sq = featurize(name, q, k)
    if form == "naive":
        return K.naive(pq, pk, v, True, mask, s, gate, q_log_scale=sq, eps=eps)
    if form in PARALLEL:
        return PARALLEL[form](pq, pk, v, mask, s, gate, chunk_size=chunk, eps=eps, q_log_scale=sq)[0]
    if form == "fla":
        return performer_fla.causal(pq, pk, v, mask, s, gate, sq, eps=eps, chunk_simple_gla=simple_gla_written_out)
    state, outs = None, []
    for t in range(q.shape[2]):
        step = lambda x: None if x is None else x[:, :, t]  # noqa: E731
        out, state = K.causal_step(
            pq[:, :, t], pk[:, :, t], v[:, :, t], state,
            None if mask is None else mask[:, t], step(s), step(gate), step(sq), eps=eps,
        )
        outs.append(out)
    return torch.stack(outs, dim=2)


def gate_logits(T, seed=3):
    return torch.randn(B, H, T, generator=torch.Generator().manual_seed(seed)) * 2


@pytest.mark.parametrize("name", MAPS)
@pytest.mark.parametrize("T", [1, 7, 300])
@pytest.mark.parametrize("gated", [False, True])
def test_chunked_and_recurrent_equal_reference_with_gradients(name, T, gated):
    q, k, v = qkv(T)
    gate = gate_logits(T) if gated else None
    results = {}
    for form in FORMS:
        xs = [x.clone().requires_grad_() for x in (q, k, v)] + ([gate.clone().requires_grad_()] if gated else [])
        out = run(form, name, *xs[:3], gate=xs[3] if gated else None)
        w = torch.randn_like(out, generator=torch.Generator().manual_seed(9))
        results[form] = (out, torch.autograd.grad((out * w).sum(), xs, allow_unused=True))
    ref, ref_grads = results["naive"]
    for form in FORMS[1:]:
        out, grads = results[form]
        assert_close(out, ref)
        for g, g_ref in zip(grads, ref_grads):
            if g_ref is not None:
                assert_close(g, g_ref)


def even_widths_only(q, k, v, g=None, scale=1.0):
    """simple_gla_written_out refusing odd feature or value widths, as fla-core 0.6's
    16-bit backward does (its kernels read an odd width's last column out of bounds)."""
    assert q.shape[-1] % 2 == 0 and k.shape[-1] % 2 == 0 and v.shape[-1] % 2 == 0, (q.shape, v.shape)
    return simple_gla_written_out(q, k, v, g, scale)


@pytest.mark.parametrize("name,d,m", [("elu", 5, None), ("favor", 8, 15), ("favor", 5, 15), ("rfa", 8, None)])
def test_fla_form_hands_the_kernel_even_widths(name, d, m):
    """Odd feature counts (elu on d = 5, FAVOR+ with 15 features) and odd [v, 1] widths
    (d = 8) reach fla-core's kernel with a zero column added, and the output and the
    gradients are the reference's, left padding and RFA's gate included."""
    T = 13
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(B, H, T, d, generator=g) for _ in range(3))
    gate = gate_logits(T) if name == "rfa" else None
    mask = torch.zeros(B, T, dtype=torch.bool)
    mask[1, :3] = True
    results = []
    for kernel in (None, even_widths_only):
        xs = [x.clone().requires_grad_() for x in (q, k, v)]
        pq, pk, s, sq = features(name, *xs[:2], {"rfa": 256}.get(name, m), torch.Generator().manual_seed(100))
        if kernel is None:
            out = K.naive(pq, pk, xs[2], True, mask, s, gate, q_log_scale=sq, eps=1e-6)
        else:
            out = performer_fla.causal(pq, pk, xs[2], mask, s, gate, sq, eps=1e-6, chunk_simple_gla=kernel)
        out = out.masked_fill(mask[:, None, :, None], 0.0)  # the padded queries' outputs are not compared
        results.append((out, *torch.autograd.grad(out.square().sum(), xs)))
    for ours, reference in zip(results[1], results[0]):
        assert_close(ours, reference)


@pytest.mark.parametrize("version,capability,trouble", [
    ("3.6.0", 90, True), ("3.4.0", 90, True), ("3.7.0+git5f1a", 90, True), ("3.7.1", 90, False),
    ("3.8.0", 90, False), ("3.3.1", 90, False), ("3.6.0", 80, False), ("3.6.0", 100, False)])
def test_gate_trouble_names_hopper_with_the_triton_that_miscompiles(monkeypatch, version, capability, trouble):
    """fla-core's gated backward is refused on Hopper (compute capability 9.x) with Triton
    3.4.0 up to 3.7.1, and only there, in one line naming the GPU, the version and the fix."""
    monkeypatch.setattr(performer_fla, "compute_capability", lambda index: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: "NVIDIA H200")
    why = performer_fla.gate_trouble(torch.device("cuda", 0), version)
    assert bool(why) == trouble
    if trouble:
        assert why == (f"on NVIDIA H200 (compute capability 9.x) Triton {version} builds fla-core's gated "
                       f"backward wrongly (fla-core issue 640); Triton 3.7.1 or newer builds it right")
    assert performer_fla.gate_trouble(torch.device("cpu"), version) is None


@pytest.mark.parametrize("name", MAPS)
def test_noncausal_equals_reference(name):
    q, k, v = qkv(11)
    pq, pk, s, sq = featurize(name, q, k)
    state = K.summarize(pk, v, None, s)
    assert_close(K.read(pq, state, v.dtype, sq, eps=1e-6), K.naive(pq, pk, v, False, None, s, q_log_scale=sq, eps=1e-6))


@pytest.mark.parametrize("name", MAPS)
@pytest.mark.parametrize("causal", [True, False])
def test_left_padding_leaves_real_positions_unchanged(name, causal):
    T, pad = 12, 5
    q, k, v = qkv(T)
    garbage = [torch.full((B, H, pad, D), 9.0) for _ in range(3)]
    qp, kp, vp = (torch.cat([g, x], dim=2) for g, x in zip(garbage, (q, k, v)))
    mask = torch.zeros(B, T + pad, dtype=torch.bool)
    mask[:, :pad] = True
    if causal:
        ref = run("naive", name, q, k, v)
        for form in FORMS:
            assert_close(run(form, name, qp, kp, vp, mask=mask)[:, :, pad:], ref)
    else:
        pq, pk, s, sq = featurize(name, q, k)
        ref = K.read(pq, K.summarize(pk, v, None, s), v.dtype, sq, eps=1e-6)
        pq, pk, s, sq = featurize(name, qp, kp)
        assert_close(K.read(pq, K.summarize(pk, vp, mask, s), v.dtype, sq, eps=1e-6)[:, :, pad:], ref)


@pytest.mark.parametrize("form", ["naive", *PARALLEL])
def test_favor_causal_stabilizer_does_not_look_ahead(form):
    """A huge future key (whose features would overflow) leaves earlier outputs bit-identical."""
    T, t = 40, 25
    q, k, v = qkv(T)
    before = run(form, "favor", q, k, v, chunk=8)
    k2 = k.clone()
    k2[:, :, t:] *= 60.0
    after = run(form, "favor", q, k2, v, chunk=8)
    assert torch.equal(before[:, :, :t], after[:, :, :t])
    assert torch.isfinite(after).all()


def test_favor_approximates_softmax_attention():
    """With many features, FAVOR+ is close to exact softmax attention (the kernel is right)."""
    T = 16
    q, k, v = (x * 0.5 for x in qkv(T))
    W = K.orthogonal_gaussian(8192, D, torch.Generator().manual_seed(0))
    (pq, sq), (pk, s) = K.favor_features(q, W), K.favor_features(k, W)
    approx = K.naive(pq, pk, v, causal=False, log_scale=s, q_log_scale=sq, eps=1e-6)
    exact = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(D), -1) @ v
    assert (approx - exact).abs().max() < 0.05


def test_favor_features_are_their_definition_with_gradients():
    """phi(x) exp(s) = exp(w . x' - |x'|^2 / 2) / sqrt(m), x' = x d^-1/4, with the
    log-scale s detached and the largest feature 1: values and gradients as
    written out, a zero input included."""
    x = torch.randn(2, 3, 5, D, generator=torch.Generator().manual_seed(4))
    x[0, 0, 0] = 0.0
    W = K.orthogonal_gaussian(24, D, torch.Generator().manual_seed(5))

    def written_out(x):
        x = x * D**-0.25
        return torch.exp(x @ W.t() - 0.5 * (x * x).sum(-1, keepdim=True)) / math.sqrt(24)

    def values_and_gradient(fn):
        x_ = x.clone().requires_grad_()
        phi = fn(x_)
        w = torch.randn(phi.shape, generator=torch.Generator().manual_seed(6))
        return phi, torch.autograd.grad((phi * w).sum(), x_)[0]

    def features(x):
        phi, s = K.favor_features(x, W)
        assert not s.requires_grad
        assert_close(phi.amax(-1), torch.ones_like(s))
        return phi * torch.exp(s).unsqueeze(-1)

    out, grad = values_and_gradient(features)
    ref, ref_grad = values_and_gradient(written_out)
    assert_close(out, ref)
    assert_close(grad, ref_grad)


@pytest.mark.parametrize("name", MAPS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_forward_at_4096_is_finite_and_close(name, dtype):
    """bf16 / fp16 inputs at T=4096: finite, within 3e-2 (relative to the output
    scale) of fp32, the loop and the parallel form alike."""
    q, k, v = qkv(4096, seed=1)
    gate = gate_logits(4096) if name == "rfa" else None
    ref = run("chunked", name, q, k, v, gate=gate, chunk=64)
    for form in PARALLEL:
        out = run(form, name, q.to(dtype), k.to(dtype), v.to(dtype), gate=gate, chunk=64)
        assert out.dtype == dtype and torch.isfinite(out).all()
        assert_close(out.float(), ref, rtol=3e-2)


@pytest.mark.parametrize("name,gated", [("elu", False), ("favor", False), ("rfa", True)])
def test_16k_decoding_steps_do_not_drift(name, gated):
    """16,384 recurrent steps in fp32 stay within 1e-4 of the parallel form at every position."""
    T = 16384
    q, k, v = (x[:1, :1] for x in qkv(T, seed=2))
    pq, pk, s, sq = featurize(name, q, k)
    gate = gate_logits(T)[:1, :1] if gated else None
    parallel, _ = K.causal_parallel(pq, pk, v, None, s, gate, chunk_size=256, eps=1e-6, q_log_scale=sq)
    state, outs = None, []
    at = lambda x, t: None if x is None else x[:, :, t]  # noqa: E731
    for t in range(T):
        out, state = K.causal_step(pq[:, :, t], pk[:, :, t], v[:, :, t], state, None, at(s, t), at(gate, t),
                                   q_log_scale=at(sq, t), eps=1e-6)
        outs.append(out)
    assert_close(torch.stack(outs, dim=2), parallel, rtol=1e-4)


def causal_forms(pq, pk, v, s, sq, eps=1e-6):
    """The three causal forms on given features: {name: output}."""
    state, steps = None, []
    for t in range(v.shape[2]):
        out, state = K.causal_step(pq[:, :, t], pk[:, :, t], v[:, :, t], state, None, s[:, :, t], None,
                                   q_log_scale=sq[:, :, t], eps=eps)
        steps.append(out)
    return {
        "naive": K.naive(pq, pk, v, True, None, s, None, q_log_scale=sq, eps=eps),
        **{form: f(pq, pk, v, None, s, None, chunk_size=8, eps=eps, q_log_scale=sq)[0] for form, f in PARALLEL.items()},
        "step": torch.stack(steps, dim=2),
    }


def exact_favor(q, k, v, m, eps=0.0):
    """Causal FAVOR+ in float64 from the unstabilized features, normalizer clamped at eps."""
    W = K.orthogonal_gaussian(m, D, torch.Generator().manual_seed(100)).double()  # featurize's draw
    x = lambda t: t.double() * D**-0.25  # noqa: E731
    phi = lambda t: torch.exp(x(t) @ W.t() - 0.5 * (x(t) ** 2).sum(-1, keepdim=True)) / math.sqrt(m)  # noqa: E731
    scores = (phi(q) @ phi(k).transpose(-1, -2)).tril()
    return (scores @ v.double()) / scores.sum(-1, keepdim=True).clamp(min=eps)


def test_without_eps_favor_is_the_exact_ratio_however_small_the_normalizer():
    """Large q, k (coordinates of std 3): true normalizers down to ~1e-11 and
    stabilized ones far below 1e-6. With eps = 0 every form gives the
    estimator exactly (no row distorted by a clamp)."""
    T, m = 48, 64
    q, k, v = (x * 3.0 for x in qkv(T, seed=4))
    pq, pk, s, sq = featurize("favor", q, k, m=m)
    exact = exact_favor(q, k, v, m)
    for form, got in causal_forms(pq, pk, v, s, sq, eps=0.0).items():
        rel = (got.double() - exact).norm(dim=-1) / exact.norm(dim=-1)
        assert rel.max() < 1e-4, f"{form}: worst row {rel.max():.3g} from the exact estimator"


def test_eps_clamps_the_true_normalizer():
    """With eps > 0 the clamp is phi(q).z >= eps for the features as defined
    (here it bites on some rows), identically in every form."""
    T, m, eps = 48, 64, 1e-8
    q, k, v = (x * 3.0 for x in qkv(T, seed=4))
    pq, pk, s, sq = featurize("favor", q, k, m=m)
    exact = exact_favor(q, k, v, m, eps)
    assert (exact - exact_favor(q, k, v, m)).abs().max() > 1e-3  # the clamp matters on this input
    for form, got in causal_forms(pq, pk, v, s, sq, eps=eps).items():
        assert_close(got.double(), exact, rtol=1e-4)


@pytest.mark.parametrize("name,eps", [("favor", 0.5), ("elu", 100.0)])
def test_eps_clamps_alike_in_every_form_with_a_gate(name, eps):
    """A recency gate and a clamp that bites: every form clamps the same rows."""
    T = 48
    q, k, v = (x * 3.0 for x in qkv(T, seed=4))
    gate = gate_logits(T) * 3
    outs = {form: run(form, name, q, k, v, gate=gate, eps=eps, chunk=8) for form in FORMS}
    assert (outs["naive"] - run("naive", name, q, k, v, gate=gate, eps=0.0)).abs().max() > 1e-2  # it bites
    for form in FORMS[1:]:
        assert_close(outs[form], outs["naive"], rtol=1e-4)


def test_an_empty_sum_gives_zero_not_nan():
    """t2r features that are all zero (relu of negatives): output 0, gradients finite."""
    q, k, v = qkv(5)
    w, b = torch.ones(H, 4, D), torch.full((H, 4), -100.0)
    pq, pk = K.t2r_features(q, w, b), K.t2r_features(k, w, b)
    for eps in (0.0, 1e-6):
        out = K.naive(pq, pk, v, True, eps=eps)
        assert torch.equal(out, torch.zeros_like(out))


def true_sums(state):
    """A state's sums in true scale relative to a common reference: exp(M) (S, z) up to one factor."""
    S = state["S"] * torch.exp(state["M"] - state["M"].amax())[..., None, None]
    return S[..., :-1], S[..., -1]


@pytest.mark.parametrize("name", MAPS)
@pytest.mark.parametrize("gated", [False, True])
def test_parallel_final_state_and_continuation(name, gated):
    """The parallel form's final state equals the loop's (same true sums), and
    running a sequence in two parts, the second from the first's state (with
    padding in both), gives the outputs and final state of one run."""
    T, cut, G = 41, 17, 6
    q, k, v = qkv(T)
    pq, pk, s, sq = featurize(name, q, k)
    gate = gate_logits(T) if gated else None
    mask = torch.zeros(B, T, dtype=torch.bool)
    mask[0, :3] = True  # left padding of the first sentence
    part = lambda x, sl: None if x is None else x[..., sl] if x.dim() == 3 else x[:, :, sl]  # noqa: E731
    whole = {form: f(pq, pk, v, mask, s, gate, sq, chunk_size=G, eps=1e-6) for form, f in PARALLEL.items()}
    for got, ref in zip(true_sums(whole["parallel"][1]), true_sums(whole["chunked"][1])):
        assert_close(got, ref)
    first, second = slice(0, cut), slice(cut, T)
    out1, state = K.causal_parallel(part(pq, first), part(pk, first), part(v, first), mask[:, first],
                                    part(s, first), part(gate, first), part(sq, first), chunk_size=G, eps=1e-6)
    out2, end = K.causal_parallel(part(pq, second), part(pk, second), part(v, second), mask[:, second],
                                  part(s, second), part(gate, second), part(sq, second), state, chunk_size=G, eps=1e-6)
    real = ~mask[:, None, :, None]
    assert_close((torch.cat([out1, out2], dim=2) * real), whole["parallel"][0] * real)
    for got, ref in zip(true_sums(end), true_sums(whole["chunked"][1])):
        assert_close(got, ref)


@pytest.mark.parametrize("name,gated", [("favor", False), ("favor", True), ("elu", False)])
def test_parallel_form_runs_as_many_ops_at_every_length(name, gated):
    """Forward and backward of the parallel form at T = 256, 1024 and 4096 run
    the same number of aten operators after a first call (the loop's grows with T / G)."""
    def forward_backward(T, form):
        q, k, v = (x[:1, :1].requires_grad_() for x in qkv(T))
        pq, pk, s, sq = featurize(name, q, k)
        gate = gate_logits(T)[:1, :1] if gated else None
        # backward from a given gradient: a sum over the output would add the CPU's
        # two-pass reduction of large tensors to the count
        return lambda: PARALLEL[form](pq, pk, v, None, s, gate, sq, chunk_size=64, eps=1e-6)[0].backward(
            torch.ones(1, 1, T, D), retain_graph=True)

    def counted(fn):
        fn()  # a first call builds the cached masks
        return count(fn)[0]

    counts = [counted(forward_backward(T, "parallel")) for T in (256, 1024, 4096)]
    assert counts[0] == counts[1] == counts[2], counts
    assert count(forward_backward(1024, "chunked"))[0] > 2 * counts[1]  # the loop, for contrast


def torch_and_triton_steps(pq, pk, v, s, gate, sq, mask, eps, device, reorder_at=None):
    """Each step's output and state from K.causal_step and ops.performer_triton's
    fused step side by side, without autograd (as in decoding: states updated in
    place); at step `reorder_at` both states' batch rows are swapped, as beam search does."""
    from linear_fairseq.ops import performer_triton

    states, pairs = [None, None], []
    with torch.no_grad():
        for t in range(v.shape[2]):
            at = lambda x: None if x is None else x[:, :, t].to(device)  # noqa: E731
            if t == reorder_at:
                order = torch.arange(B - 1, -1, -1, device=device)
                states = [{key: x.index_select(0, order) for key, x in state.items()} for state in states]
            outs = []
            for i, step in enumerate((K.causal_step, performer_triton.causal_step)):
                out, states[i] = step(at(pq), at(pk), at(v), states[i], mask[:, t].to(device), at(s), at(gate),
                                      at(sq), eps=eps)
                outs.append(out)
            pairs.append((outs, [{key: x.clone() for key, x in state.items()} for state in states]))
    return pairs


@pytest.mark.parametrize("name", MAPS)
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("eps", [0.0, 0.5, 100.0])
def test_triton_step_equals_the_torch_step(triton_device, name, gated, eps):
    """The fused decoding step (ops.performer_triton; on CUDA, or on CPU through
    Triton's interpreter) writes the torch step's output and moves its state (S, M)
    alike at every step: log-scales, RFA's gate, a row whose first steps are
    padding, a clamp that bites (eps 0.5, 100), beams reordered halfway."""
    T = 8
    q, k, v = (x * 3.0 for x in qkv(T, seed=5))
    pq, pk, s, sq = featurize(name, q, k)
    mask = torch.zeros(B, T, dtype=torch.bool)
    mask[1, :3] = True
    pairs = torch_and_triton_steps(pq, pk, v, s, gate_logits(T) if gated else None, sq, mask, eps, triton_device,
                                   reorder_at=T // 2)
    for (out, theirs), (state, their_state) in pairs:
        assert_close(theirs.cpu(), out.cpu())
        assert_same_state(their_state, state)


def assert_same_state(actual, expected):
    """[S, z] close; the reference M close where finite, -inf (no key yet) in the same places."""
    assert_close(actual["S"].cpu(), expected["S"].cpu())
    M, their_M = expected["M"].cpu(), actual["M"].cpu()
    assert torch.equal(M.isinf(), their_M.isinf())
    assert_close(their_M.nan_to_num(0.0, 0.0, 0.0), M.nan_to_num(0.0, 0.0, 0.0))


def test_triton_step_takes_strided_half_inputs(triton_device):
    """The fused step reads features, values and log-scales through their strides
    (views of one projection, as the module passes them) and writes values of v's dtype."""
    T = 6
    q, k, v = qkv(T, seed=6)
    pq, pk, s, sq = featurize("favor", q, k)
    packed = torch.stack([pq, pk], dim=-2)  # (B, H, T, 2, m): the module's pair axis
    v = torch.cat([v, v], dim=-1)[..., ::2].half()  # every other column: strided
    pairs = torch_and_triton_steps(packed[..., 0, :], packed[..., 1, :], v, s, None, sq,
                                   torch.zeros(B, T, dtype=torch.bool), 0.0, triton_device)
    for (out, theirs), (state, their_state) in pairs:
        assert theirs.dtype == torch.float16
        assert_close(theirs.float().cpu(), out.float().cpu(), rtol=1e-3)
        assert_close(their_state["S"].cpu(), state["S"].cpu())


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("eps", [0.0, 0.5])
def test_triton_favor_step_equals_favor_features_then_the_torch_step(triton_device, gated, eps):
    """With FAVOR+ the fused step computes the features too (from q, k and the
    projection, as favor_features defines them, 20 features in blocks of 32 and
    a head width of 8): the torch step's output and state at every step, a row
    whose first steps are padding, beams reordered halfway."""
    from linear_fairseq.ops import performer_triton

    T, m = 8, 20
    q, k, v = (x * 2.0 for x in qkv(T, seed=7))
    W = K.orthogonal_gaussian(m, D, torch.Generator().manual_seed(1))
    gate = gate_logits(T) if gated else None
    mask = torch.zeros(B, T, dtype=torch.bool)
    mask[0, :2] = True
    to = lambda x: None if x is None else x.to(triton_device)  # noqa: E731
    states = [None, None]
    with torch.no_grad():
        for t in range(T):
            if t == T // 2:
                order = torch.arange(B - 1, -1, -1, device=triton_device)
                states = [{key: x.index_select(0, order) for key, x in state.items()} for state in states]
            at = lambda x: None if x is None else to(x[:, :, t])  # noqa: E731
            (pq, sq), (pk, s) = K.favor_features(at(q), to(W)), K.favor_features(at(k), to(W))
            out, states[0] = K.causal_step(pq, pk, at(v), states[0], to(mask[:, t]), s, at(gate), sq, eps=eps)
            theirs, states[1] = performer_triton.favor_step(at(q), at(k), at(v), to(W), states[1], to(mask[:, t]),
                                                             at(gate), eps=eps)
            assert_close(theirs.cpu(), out.cpu())
            assert_same_state(states[1], states[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d,m", [(64, 266), (8, 20)])
def test_favor_kernels_equal_favor_features_with_gradients(triton_device, dtype, d, m):
    """FAVOR+'s features on the training kernels (ops.favor_triton) against the torch
    function: the features and log-scales, x's gradient (in x's dtype), no gradient
    through the log-scale; the inputs a strided view of the queries' and keys'
    projections, as the module passes them, rows not a whole number of blocks,
    m (266 = d ln d) not a whole number of the kernel's feature blocks."""
    from linear_fairseq.ops import favor_triton

    g = torch.Generator().manual_seed(5)
    qkv = torch.randn(2, 11, 3, 3, d, generator=g).to(dtype)  # (B, T, q/k/v, H, d)
    W = K.orthogonal_gaussian(m, d, g)
    x = qkv[:, :, :2].permute(0, 3, 1, 2, 4)  # (B, H, T, 2, d), not contiguous
    dphi = torch.randn(2, 3, 11, 2, m, generator=g)
    outs = []
    for features in (K.favor_features, favor_triton.favor_features):
        xs = x.detach().to(triton_device).requires_grad_()
        phi, scale = features(xs, W.to(triton_device))
        (phi * dphi.to(triton_device)).sum().backward()
        assert not scale.requires_grad and phi.dtype == scale.dtype == torch.float32
        assert xs.grad.dtype == dtype and phi.shape == (2, 3, 11, 2, m) and scale.shape == (2, 3, 11, 2)
        outs.append((phi.cpu(), scale.cpu(), xs.grad.float().cpu()))
    (phi, scale, grad), (phi_k, scale_k, grad_k) = outs
    assert_close(phi_k, phi)
    assert_close(scale_k, scale)
    # in half precision x's gradient is rounded to x's dtype from float32 sums taken in another order
    assert_close(grad_k, grad, rtol=RTOL if dtype == torch.float32 else 2 * torch.finfo(dtype).eps)
