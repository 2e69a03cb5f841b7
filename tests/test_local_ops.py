"""Local precision's ops (ops/local.py) against their definitions: the short
convolution and the sliding-window softmax, parallel and step by step, with
padding, gradients and the decoding state; the parallel forms run a number of
operators that does not grow with the length; a window's projections load
from a state dict that keeps them apart."""
import pytest
import torch

from benchmarks.op_counts import count
from conftest import TINY_LM, TINY_MT, make_model, random_tokens
from linear_fairseq.ops import local as L


def padding(B, T, seed=0):
    """Row 1 left-padded by a third of T (fairseq's source layout), row 0 not padded."""
    mask = torch.zeros(B, T, dtype=torch.bool)
    mask[1, : T // 3] = True
    return mask


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("K", [1, 2, 3, 4])
def test_conv_equals_its_definition_outputs_and_gradients(causal, K):
    g = torch.Generator().manual_seed(K)
    x = torch.randn(2, 11, 6, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(6, K, dtype=torch.float64, generator=g, requires_grad=True)
    mask = padding(2, 11)
    fast, ref = L.conv(x, w, causal, mask), L.conv_naive(x, w, causal, mask)
    torch.testing.assert_close(fast, ref)
    grads = [torch.autograd.grad(out.pow(2).sum(), (x, w)) for out in (fast, ref)]
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("K", [1, 2, 4])
def test_conv_steps_equal_the_causal_form_and_keep_the_last_inputs(K):
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(2, 9, 5, generator=g), torch.randn(5, K, generator=g)
    mask = padding(2, 9)
    state, outs = None, []
    for t in range(9):
        out, state = L.conv_step(x[:, t], w, state, mask[:, t])
        outs.append(out)
    torch.testing.assert_close(torch.stack(outs, 1), L.conv(x, w, True, mask))
    assert state.shape == (2, K - 1, 5)
    torch.testing.assert_close(state, x[:, 9 - (K - 1):] if K > 1 else x[:, :0])


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("W", [1, 2, 5, 8])
@pytest.mark.parametrize("T", [1, 7, 24])
def test_window_equals_the_masked_softmax_outputs_and_gradients(causal, W, T):
    g = torch.Generator().manual_seed(W * 100 + T)
    q, k, v = (torch.randn(2, 3, T, 4, dtype=torch.float64, generator=g, requires_grad=True) for _ in range(3))
    mask = padding(2, T)
    fast, ref = L.window(q, k, v, W, causal, mask), L.window_naive(q, k, v, W, causal, mask)
    torch.testing.assert_close(fast, ref)
    grads = [torch.autograd.grad(out.pow(2).sum(), (q, k, v)) for out in (fast, ref)]
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_window_reaches_exactly_its_width():
    """A key W positions back (causal) or W//2 + 1 away (non-causal) is out of reach."""
    T, W = 12, 4
    v = torch.eye(T).view(1, 1, T, T)  # each key's value names it
    q = k = torch.zeros(1, 1, T, T)  # equal scores: the output is the mean over the keys in reach
    causal = L.window(q, k, v, W, True)[0, 0]
    assert (causal[8] > 0).nonzero().flatten().tolist() == [5, 6, 7, 8]
    both = L.window(q, k, v, W, False)[0, 0]
    assert (both[8] > 0).nonzero().flatten().tolist() == [6, 7, 8, 9, 10]


@pytest.mark.parametrize("W", [1, 3, 8])
@pytest.mark.parametrize("padded", [True, False])
@pytest.mark.parametrize("grad", [False, True])  # without autograd the ring is written in place
def test_window_steps_equal_the_causal_form_with_a_state_of_w_keys(W, padded, grad):
    g = torch.Generator().manual_seed(W)
    q, k, v = (torch.randn(2, 3, 20, 4, generator=g, requires_grad=grad) for _ in range(3))
    mask = padding(2, 20) if padded else None
    state, outs = None, []
    for t in range(20):
        out, state = L.window_step(q[:, :, t], k[:, :, t], v[:, :, t], state, W, None if mask is None else mask[:, t])
        outs.append(out)
        assert state["k"].shape == (2, 3, W, 4) and state["bias"].shape == (2, 1, 1, W)  # whatever the prefix
    steps, parallel = torch.stack(outs, 2), L.window(q, k, v, W, True, mask)
    torch.testing.assert_close(steps, parallel, atol=1e-5, rtol=1e-5)
    ring = [t % W for t in range(20 - W, 20)]  # step t writes slot t mod W
    torch.testing.assert_close(state["k"][:, :, ring], k[:, :, 20 - W:])
    assert (state["bias"][:, 0, 0, ring] == 0).all() and state["slot"].tolist() == [20 % W] * 2
    if grad:
        g_out = torch.randn(steps.shape, generator=g)
        for a, b in zip(*(torch.autograd.grad((out * g_out).sum(), (q, k, v)) for out in (steps, parallel))):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_follow_fp32(dtype):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 300, 16, generator=g) * 3 for _ in range(3))
    ref = L.window(q, k, v, 64, True)
    half = L.window(q.to(dtype), k.to(dtype), v.to(dtype), 64, True)
    assert half.dtype == dtype and torch.isfinite(half).all()
    assert (half.float() - ref).abs().max() < (0.05 if dtype == torch.float16 else 0.2)  # bf16: 8 bits


@pytest.mark.parametrize("causal", [True, False])
def test_parallel_forms_run_as_many_operators_at_any_length(causal):
    """Forward and backward with a dense output gradient, as training has (the
    gradient of a plain sum is a broadcast scalar, which CPU batched products
    copy out one matrix at a time)."""
    def run(T):
        q, k, v = (torch.randn(1, 2, T, 8, requires_grad=True) for _ in range(3))
        x, w = torch.randn(1, T, 16, requires_grad=True), torch.randn(16, 4, requires_grad=True)
        g1, g2 = torch.randn(1, 2, T, 8), torch.randn(1, T, 16)
        return lambda: ((L.window(q, k, v, 16, causal) * g1).sum() + (L.conv(x, w, causal) * g2).sum()).backward()

    counts = {T: count(run(T))[0] for T in (64, 256, 1024)}
    assert len(set(counts.values())) == 1, counts


PARTS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "pkv_proj": ("phi", "w_l", "w_r")}


@pytest.mark.parametrize("arch,extra,task,stacked", [
    ("memsizer_lm", ["--local-window", "4"], "language_modeling", {"qkv_proj": 2, "pkv_proj": 2}),  # window, MemSizer
    ("memsizer_transformer", ["--encoder-self-attn", "memsizer"], "translation", {"pkv_proj": 4}),  # cross kept apart
    ("performer_lm", [], "language_modeling", {"qkv_proj": 2}),  # kernel attention's own
    ("performer_lm", ["--local-window", "4"], "language_modeling", {"qkv_proj": 4}),  # both
])
def test_projections_kept_apart_load_into_the_stacked_one(arch, extra, task, stacked):
    """fairseq's load path (upgrade_state_dict_named) stacks a state dict's
    q_proj, k_proj and v_proj into qkv_proj (the window's, a self-attention's),
    and MemSizer's phi, w_l and w_r into pkv_proj (a self-attention's): the same
    model."""
    args = (TINY_LM if task == "language_modeling" else TINY_MT) + extra
    model, d = make_model(arch, args, task=task)
    widths = {name: getattr(m, "widths", None) for name, m in model.named_modules()}
    apart, found = {}, {fused: 0 for fused in stacked}
    for name, tensor in model.state_dict().items():
        path, kind = name.rsplit(".", 1)
        module, _, fused = path.rpartition(".")
        if fused not in PARTS:
            apart[name] = tensor.clone()
            continue
        parts = tensor.split(list(widths[module])) if fused == "pkv_proj" else tensor.chunk(3)
        apart.update({f"{module}.{part}.{kind}": t.clone() for part, t in zip(PARTS[fused], parts)})
        found[fused] += kind == "weight"
    assert found == stacked
    other, _ = make_model(arch, args, task=task, seed=1)
    other.load_state_dict(apart, strict=True)
    tokens = random_tokens(d, 2, 9)
    inputs = (tokens, torch.full((2,), 9), tokens) if task == "translation" else (tokens,)
    torch.testing.assert_close(other(*inputs)[0], model(*inputs)[0], rtol=0, atol=0)


def test_window_mask_first_built_in_inference_mode_serves_training():
    """The window's cached mask built by a first call in inference mode (e.g.
    generation) is an ordinary tensor: training afterwards saves it for backward.
    A length and width no other test uses, so this call builds it."""
    q, k, v = (torch.randn(1, 2, 37, 4, requires_grad=True) for _ in range(3))
    with torch.inference_mode():
        L.window(q, k, v, 11, True)
    L.window(q, k, v, 11, True).sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()


def torch_and_triton_window_steps(q, k, v, W, mask, device, head_weight, reorder_at):
    """Each step's output and state from L.window_step (then scaled by head_weight, as
    the module merges it) and ops.local_triton's kernel side by side, without autograd
    (the rings written in place); at step `reorder_at` both states' batch rows are
    swapped, as beam search does."""
    from linear_fairseq.ops import local_triton

    states, pairs = [None, None], []
    with torch.no_grad():
        for t in range(v.shape[2]):
            at = lambda x: None if x is None else x[:, :, t].to(device)  # noqa: E731
            step_mask = None if mask is None else mask[:, t].to(device)
            if t == reorder_at:
                order = torch.arange(q.shape[0] - 1, -1, -1, device=device)
                states = [{key: x.index_select(0, order) for key, x in state.items()} for state in states]
            out, states[0] = L.window_step(at(q), at(k), at(v), states[0], W, step_mask)
            out = out * head_weight.view(-1, 1).to(device, out.dtype)
            theirs, states[1] = local_triton.window_step(at(q), at(k), at(v), states[1], W, step_mask,
                                                         head_weight.to(device))
            pairs.append(((out, theirs), [{key: x.clone() for key, x in state.items()} for state in states]))
    return pairs


@pytest.mark.parametrize("W", [1, 3, 8, 70])  # 70: the ring read in two blocks
@pytest.mark.parametrize("padded", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_window_step_equals_the_torch_step(triton_device, W, padded, dtype):
    """The window's decoding step on its Triton kernel (ops.local_triton; on CUDA, or
    on CPU through Triton's interpreter) writes the torch step's output, scaled per
    head, and the same ring (keys, values, bias, the next slot) at every step: a ring
    that wraps, a row whose first steps are padding (it reads zeros), q, k, v as views
    of one projection (strided), beams reordered halfway."""
    g = torch.Generator().manual_seed(W)
    T = 12 if W > 8 else 20
    qkv = torch.randn(2, 3, T, 3, 4, generator=g).to(dtype)  # q, k, v interleaved, as the projection's heads
    q, k, v = qkv.unbind(-2)
    mask = padding(2, T) if padded else None
    head_weight = torch.randn(3, generator=g)
    pairs = torch_and_triton_window_steps(q, k, v, W, mask, triton_device, head_weight, reorder_at=T // 2)
    for (out, theirs), (state, their_state) in pairs:
        assert theirs.dtype == dtype
        torch.testing.assert_close(theirs.cpu(), out.cpu(), **({} if dtype == torch.float32 else {"atol": 2e-3,
                                                                                                     "rtol": 2e-3}))
        for name in L.WINDOW_STATE:
            assert torch.equal(their_state[name].cpu(), state[name].cpu()), name
    if padded:  # the padded row's first step saw no real key
        assert (pairs[0][0][1][1] == 0).all() and (pairs[0][0][1][0] != 0).any()


def test_local_backend_triton_off_cuda_is_one_line_naming_why():
    """--local-backend triton where the kernel cannot run: one line naming why and the
    way out; auto decodes on the torch step there."""
    from linear_fairseq.errors import ConfigError
    from linear_fairseq.modules.local import SlidingWindow

    x = torch.randn(2, 8)
    with pytest.raises(ConfigError) as err, torch.no_grad():
        SlidingWindow(8, 2, 4, True, "triton").step(x, None, None)
    message = str(err.value)
    assert "\n" not in message and message.startswith("--local-backend triton: the model runs on cpu, not CUDA")
    assert "--local-backend auto" in message
    assert not SlidingWindow(8, 2, 4, True, "auto").runs_on_triton(x)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("W,T", [(1, 7), (5, 40), (16, 70), (40, 33)])  # 70: three blocks; 40 > 33: all in reach
@pytest.mark.parametrize("padded", [True, False])
def test_triton_window_equals_the_torch_form_outputs_and_gradients(triton_device, causal, W, T, padded):
    """The window's training form on its Triton kernels (ops.local_triton.window; on
    CUDA, or on CPU through Triton's interpreter), q, k and v one projection, against
    ops.local.window: outputs and the gradients of q, k and v, with a left-padded row
    (its first queries see only padding: zeros)."""
    from linear_fairseq.ops import local_triton

    g = torch.Generator().manual_seed(W * 100 + T)
    qkv = torch.randn(2, T, 3, 3, 6, generator=g)
    mask = padding(2, T) if padded else None
    grad_out = torch.randn(2, T, 3, 6, generator=g)
    results = []
    for fast in (False, True):
        x = qkv.to(triton_device, copy=True).requires_grad_()  # a leaf of its own for each form
        m = None if mask is None else mask.to(triton_device)
        if fast:
            out = local_triton.window(x, W, causal, m)
        else:
            out = L.window(*(t.transpose(1, 2) for t in x.unbind(2)), W, causal, m).transpose(1, 2)
        (out * grad_out.to(triton_device)).sum().backward()
        results.append((out.detach().cpu(), x.grad.cpu()))
    (out, grad), (theirs, their_grad) = results
    torch.testing.assert_close(theirs, out)
    torch.testing.assert_close(their_grad, grad)
    if padded and causal:
        assert (theirs[1, : T // 3] == 0).all()


@pytest.mark.parametrize("causal,padded", [(True, True), (False, False)])
def test_triton_window_backward_on_an_older_gpus_tiles_gives_the_same_gradients(monkeypatch, triton_device, causal,
                                                                                  padded):
    """Below compute capability 8.0 (sm_70, sm_75) the backward takes 16 queries or keys
    a program, where 32 spills registers there: the gradients equal the torch form's
    over three blocks of 32 (and five of 16) with a window reaching across them."""
    from linear_fairseq.ops import local_triton

    launched, launch = [], local_triton._launch
    monkeypatch.setattr(local_triton, "capability", lambda x: 75)
    monkeypatch.setattr(local_triton, "_launch", lambda kernel, *a, **k: launched.append(
        (kernel, k.get("BLOCK", local_triton.BLOCK))) or launch(kernel, *a, **k))
    g = torch.Generator().manual_seed(7)
    T, W = 70, 20
    qkv = torch.randn(2, T, 3, 2, 8, generator=g)
    mask = padding(2, T) if padded else None
    grad_out = torch.randn(2, T, 2, 8, generator=g)
    grads = []
    for fast in (False, True):
        x = qkv.to(triton_device, copy=True).requires_grad_()
        m = None if mask is None else mask.to(triton_device)
        out = (local_triton.window(x, W, causal, m) if fast else
               L.window(*(t.transpose(1, 2) for t in x.unbind(2)), W, causal, m).transpose(1, 2))
        (out * grad_out.to(triton_device)).sum().backward()
        grads.append(x.grad.cpu())
    torch.testing.assert_close(grads[1], grads[0])
    assert launched == [(local_triton._forward_kernel, 32), (local_triton._backward_kernel, 16),
                        (local_triton._backward_kernel, 16)]


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_triton_window_takes_half_precision_and_strided_inputs(triton_device, dtype):
    """The training kernels read q, k, v through the strides of a view (every other
    head of a wider projection) and keep the input's dtype, to half precision's
    rounding of the float32 form (bfloat16 is left out: Triton's interpreter
    multiplies it wrongly)."""
    from linear_fairseq.ops import local_triton

    g = torch.Generator().manual_seed(3)
    wide = torch.randn(2, 50, 3, 6, 8, generator=g)
    qkv = wide[:, :, :, ::2].to(triton_device, dtype).requires_grad_()  # (2, 50, 3, 3, 8), strided heads
    out = local_triton.window(qkv, 16, True)
    out.float().pow(2).sum().backward()
    ref_in = wide[:, :, :, ::2].to(triton_device).requires_grad_()
    ref = L.window(*(t.transpose(1, 2) for t in ref_in.unbind(2)), 16, True).transpose(1, 2)
    ref.pow(2).sum().backward()
    tol = {"atol": 0, "rtol": 0} if dtype == torch.float32 else {"atol": 1e-2, "rtol": 1e-2}
    assert out.dtype == dtype and qkv.grad.dtype == dtype
    torch.testing.assert_close(out.float(), ref, **({"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else tol))
    torch.testing.assert_close(qkv.grad.float(), ref_in.grad, **({"atol": 1e-5, "rtol": 1e-5}
                                                                  if dtype == torch.float32 else tol))


@pytest.mark.parametrize("arch,extra", [
    ("memsizer_transformer", ["--encoder-self-attn", "memsizer", "--encoder-self-memory-size", "4",
                              "--local-window", "6"]),
    ("performer_lm", ["--local-window", "5", "--feature-map", "elu", "--kernel-backend", "torch"]),
])
def test_a_model_trains_on_the_window_kernels_as_on_torch(monkeypatch, triton_device, arch, extra):
    """A model whose windows (causal in the decoder, centred in the encoder; a padded
    source) run on their training kernels gives the torch forms' loss and gradients."""
    from linear_fairseq.modules.local import SlidingWindow

    lm = arch.endswith("_lm")
    model, d = make_model(arch, (TINY_LM if lm else TINY_MT) + extra,
                          task="language_modeling" if lm else "translation")
    model.to(triton_device).train()
    with torch.no_grad():  # the heads weighed apart (they start at 1)
        for module in model.modules():
            if isinstance(module, SlidingWindow):
                module.head_weight.uniform_(0.5, 1.5)
    src = random_tokens(d, 2, 13).to(triton_device)
    src[1, :5] = d.pad()  # left padding, as fairseq batches sources
    prev = random_tokens(d, 2, 9, seed=1).to(triton_device)
    from linear_fairseq.ops import local_triton

    launched, window = [], local_triton.window
    monkeypatch.setattr(local_triton, "window", lambda qkv, W, causal, mask: launched.append(causal) or
                        window(qkv, W, causal, mask))
    results = []
    for fast in (False, True):
        monkeypatch.setattr(SlidingWindow, "runs_on_triton", lambda self, x, fast=fast: fast)
        model.zero_grad()
        net = model(prev) if lm else model(src, torch.tensor([13, 8]).to(triton_device), prev)
        logits = net[0]
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), prev.flatten())
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    (loss, grads), (their_loss, their_grads) = results
    assert sorted(set(launched)) == ([True] if lm else [False, True])  # every window on the kernels
    torch.testing.assert_close(their_loss, loss)
    assert len(grads) == len(their_grads)
    for a, b in zip(their_grads, grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
