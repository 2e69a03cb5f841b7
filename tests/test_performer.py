"""Kernel-attention specifics: random features are deterministic in eval and
after reloading, redrawn only in training and only on schedule; low precision
at long context; option errors."""
import pytest
import torch

from conftest import TINY_LM, TINY_MT, make_model, parse_model_args, random_tokens
from linear_fairseq.errors import ConfigError
from linear_fairseq.modules.performer_attention import PerformerAttention

ARGS = TINY_LM + ["--feature-map", "favor", "--num-features", "16", "--redraw-interval", "3"]


def lm_logits(model, tokens):
    with torch.no_grad():
        return model(tokens)[0]


def test_eval_is_deterministic_and_reload_restores_the_features(tmp_path):
    model, d = make_model("performer_lm", ARGS, "language_modeling", seed=0)
    tokens = random_tokens(d, 2, 20)
    first, second = lm_logits(model, tokens), lm_logits(model, tokens)
    assert torch.equal(first, second)
    torch.save(model.state_dict(), tmp_path / "model.pt")
    other, _ = make_model("performer_lm", ARGS, "language_modeling", seed=123)  # other random features
    assert not torch.equal(lm_logits(other, tokens), first)
    other.load_state_dict(torch.load(tmp_path / "model.pt"))
    assert torch.equal(lm_logits(other, tokens), first)


def projections(model):
    return [m.phi.projection.clone() for m in model.modules() if isinstance(m, PerformerAttention)]


def test_redraw_only_in_training_and_on_schedule():
    """fairseq's trainer calls set_num_updates after every update: interval 3
    redraws at updates 3 and 6, in training only, the same draw for the same
    seed and update (as on another worker, or after a resume)."""
    model, d = make_model("performer_lm", ARGS, "language_modeling")
    tokens = random_tokens(d, 2, 8)
    for n in range(1, 7):  # eval: never
        before = projections(model)
        lm_logits(model, tokens)
        model.set_num_updates(n)
        assert all(torch.equal(a, b) for a, b in zip(before, projections(model)))
    model.train()
    twin, _ = make_model("performer_lm", ARGS, "language_modeling")
    twin.train()
    changed = []
    for n in range(1, 8):
        before = projections(model)
        model(tokens)  # forward passes do not redraw
        model.set_num_updates(n)
        twin.set_num_updates(n)
        changed.append(all(not torch.equal(a, b) for a, b in zip(before, projections(model))))
        assert all(torch.equal(a, b) for a, b in zip(projections(twin), projections(model)))
    assert changed == [False, False, True, False, False, True, False]


def test_no_redraw_when_interval_is_zero():
    model, d = make_model("performer_lm", TINY_LM + ["--redraw-interval", "0"], "language_modeling")
    model.train()
    before = projections(model)
    for n in range(1, 5):
        model(random_tokens(d, 2, 8))
        model.set_num_updates(n)
    assert all(torch.equal(a, b) for a, b in zip(before, projections(model)))


# RFA's sin/cos normalizer is not positive-definite: near-zero normalizers
# amplify bf16 rounding (measured 8e-2 here), hence its wider tolerance.
BF16_TOLERANCE = {"elu": 2e-2, "favor": 2e-2, "rfa": 0.15, "t2r": 2e-2}


@pytest.mark.parametrize("feature_map", list(BF16_TOLERANCE))
def test_bf16_module_forward_at_4096(feature_map):
    """The causal module, all in bf16, at T=4096: finite and within BF16_TOLERANCE
    (max error over the output's max magnitude) of the fp32 module."""
    torch.manual_seed(0)
    attn = PerformerAttention(64, 4, feature_map=feature_map, num_features=None, redraw_interval=0,
                              rfa_gate=feature_map == "rfa", kernel_chunk_size=64, kernel_eps=None,
                              causal=True).eval()
    x = torch.randn(4096, 1, 64)
    with torch.no_grad():
        ref = attn(x)[0]
        out = attn.to(torch.bfloat16)(x.bfloat16())[0]
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    err = (out.float() - ref).abs().max() / ref.abs().max()
    assert err < BF16_TOLERANCE[feature_map], f"bf16 relative error {err:.3g}"


def test_default_feature_counts():
    cfg = parse_model_args("performer_transformer_iwslt_de_en")
    assert (cfg.encoder_self_attn, cfg.decoder_self_attn, cfg.cross_attn, cfg.feature_map) == (
        "performer", "performer", "performer", "favor")
    model, _ = make_model("performer_transformer", TINY_MT)  # head dim 8: favor uses round(8 ln 8) = 17
    assert {m.phi.projection.shape for m in model.modules() if isinstance(m, PerformerAttention)} == {(17, 8)}


@pytest.mark.parametrize(
    "args,message",
    [
        (["--num-features", "0"], "--num-features=0: must be a positive integer"),
        (["--feature-map", "elu", "--num-features", "8"], "--num-features=8: elu has no features"),
        (["--redraw-interval", "-1"], "--redraw-interval=-1: must be an integer >= 0"),
        (["--kernel-eps", "-1"], "--kernel-eps=-1.0: must be >= 0"),
        (["--kernel-chunk-size", "0"], "--kernel-chunk-size=0: must be a positive integer"),
        (["--encoder-attention-heads", "5"], "--encoder-attention-heads=5 must be a positive divisor of --encoder-embed-dim=32"),
    ],
)
def test_bad_options_name_the_option_and_value(args, message):
    with pytest.raises(ValueError) as err:
        make_model("performer_transformer", TINY_MT + args)
    assert message in str(err.value)


def test_unknown_feature_map_is_rejected_by_the_parser(capsys):
    with pytest.raises(SystemExit):
        parse_model_args("performer_lm", ["--feature-map", "cosine"], task="language_modeling")
    assert "invalid choice: 'cosine'" in capsys.readouterr().err


@pytest.mark.parametrize("feature_map,eps", [("elu", 0.0), ("favor", 0.0), ("rfa", 1e-6), ("t2r", 1e-6)])
def test_normalizer_clamp_defaults(feature_map, eps):
    """rfa and t2r features can cancel or vanish, so they keep a clamp; elu and favor need none."""
    from linear_fairseq.modules.performer_attention import PerformerAttention

    attn = PerformerAttention(16, 2, feature_map=feature_map, num_features=None if feature_map == "elu" else 8,
                              redraw_interval=0, rfa_gate=False, kernel_chunk_size=64, kernel_eps=None)
    assert attn.eps == eps



@pytest.mark.parametrize("feature_map,gate", [("elu", False), ("favor", False), ("rfa", True), ("t2r", False)])
@pytest.mark.parametrize("causal", [True, False])
def test_attention_weights_are_the_weights_the_module_applies(feature_map, gate, causal):
    """attention_weights (the quadratic form calibration fits) times the values,
    through out_proj, is the module's own output: causal (chunked), and over a
    padded source."""
    torch.manual_seed(0)
    attn = PerformerAttention(32, 4, feature_map=feature_map, num_features=None if feature_map == "elu" else 16,
                              redraw_interval=0, rfa_gate=gate, kernel_chunk_size=4, kernel_eps=None, causal=causal).double().eval()
    x = torch.randn(3, 11, 32, dtype=torch.float64)
    pad = torch.zeros(3, 11, dtype=torch.bool)
    pad[1, 8:] = True
    weights = attn.attention_weights(x, x, pad)
    assert weights.shape == (3, 4, 11, 11)
    out = attn.merge(weights @ attn.heads(*attn.project(x, "v")), x.dtype)
    expected = attn.causal_parallel(x, pad) if causal else attn.read(x, attn.summarize(x, pad))
    torch.testing.assert_close(out, expected)
    assert weights[1, :, :, 8:].abs().max() == 0  # padded keys get nothing
    if causal:
        assert weights.triu(1).abs().max() == 0  # nor future ones


def causal_attention(backend, feature_map="favor", gate=False):
    torch.manual_seed(0)
    return PerformerAttention(32, 4, feature_map=feature_map, num_features=None if feature_map == "elu" else 16,
                              redraw_interval=0, rfa_gate=gate, kernel_chunk_size=8, kernel_eps=None,
                              kernel_backend=backend, causal=True)


def test_kernel_backend_fla_off_cuda_is_one_line_naming_why():
    attn = causal_attention("fla")
    with pytest.raises(ConfigError) as err:
        attn(torch.randn(10, 2, 32))
    message = str(err.value)
    assert "\n" not in message and message.startswith("--kernel-backend fla: the model runs on cpu, not CUDA")
    assert "--kernel-backend auto" in message and "kernel_backend" in message


def test_kernel_backend_auto_runs_the_torch_form_off_cuda():
    x = torch.randn(10, 2, 32)
    assert torch.equal(causal_attention("auto")(x)[0], causal_attention("torch")(x)[0])


def test_rfa_gate_trains_on_torch_where_fla_core_would_miscompile_it(monkeypatch, caplog):
    """Where performer_fla.gate_trouble names a reason (a Hopper GPU with a Triton that
    builds fla-core's gated backward wrongly), `auto` trains RFA's gate on the torch form,
    saying so once, and `fla` is one line naming why; a module without the gate still
    trains on fla-core's kernel there."""
    from test_performer_ops import simple_gla_written_out

    from linear_fairseq.modules import backends
    from linear_fairseq.ops import performer_fla

    why = "on NVIDIA H200 (compute capability 9.x) Triton 3.6.0 builds fla-core's gated backward wrongly"
    monkeypatch.setattr(performer_fla, "gate_trouble", lambda device: why)
    x = torch.randn(10, 2, 32)
    gated, plain = causal_attention("auto", "rfa", True), causal_attention("auto", "elu")
    for attn in (gated, plain):
        monkeypatch.setattr(attn, "runs_on_triton", lambda x: True)
    ran = []
    monkeypatch.setattr(performer_fla, "kernel", lambda: ran.append(1) or simple_gla_written_out)
    backends.say_once.cache_clear()
    with caplog.at_level("WARNING"):
        for _ in range(2):
            assert torch.equal(gated(x)[0], causal_attention("torch", "rfa", True)(x)[0])
    assert ran == []
    assert [r.getMessage() for r in caplog.records] == [f"--kernel-backend auto: {why}; RFA's gate trains on torch"]
    plain(x)
    assert ran == [1]
    gated.kernel_backend = "fla"
    with pytest.raises(ConfigError) as err:
        gated(x)
    assert str(err.value) == f"--kernel-backend fla: {why} (or --kernel-backend auto: RFA's gate then trains on torch)"


@pytest.mark.parametrize("feature_map,gate", [("favor", False), ("elu", False), ("rfa", True)])
def test_module_on_the_fla_form_equals_the_torch_form(monkeypatch, feature_map, gate):
    """The module's arguments reach ops.performer_fla in the right order: with
    fla-core's kernel written out (tests/test_performer_ops.py), the module's
    output and gradients equal the torch form's, left padding included."""
    from test_performer_ops import simple_gla_written_out

    from linear_fairseq.ops import performer_fla

    x = torch.randn(13, 2, 32)
    mask = torch.zeros(2, 13, dtype=torch.bool)
    mask[1, :4] = True
    results = []
    for backend in ("torch", "fla"):
        attn = causal_attention("torch", feature_map, gate)
        if backend == "fla":
            monkeypatch.setattr(attn, "runs_on_triton", lambda x: True)
            monkeypatch.setattr(performer_fla, "kernel", lambda: simple_gla_written_out)
        xs = x.clone().requires_grad_()
        out = attn(xs, key_padding_mask=mask)[0]
        out[:, 0].sum().backward()  # the unpadded row
        results.append((out[:, 0], xs.grad, out[4:, 1]))
    for ours, theirs in zip(*results):  # relative to each tensor's scale: RFA's random features reach 1e4
        assert (ours - theirs).abs().max() <= 1e-5 * theirs.abs().max().clamp(min=1.0), (ours - theirs).abs().max()


@pytest.mark.parametrize("feature_map,gate", [("favor", False), ("elu", False), ("rfa", True), ("t2r", False)])
def test_fla_backend_equals_the_torch_form(monkeypatch, triton_device, feature_map, gate):
    """fla-core's own chunk_simple_gla (on CUDA, or on CPU through Triton's
    interpreter) computes the torch form's function: outputs and gradients,
    left padding included, over several chunks and a partial one."""
    from linear_fairseq.ops import performer_fla

    if performer_fla.unavailable():
        pytest.skip(performer_fla.unavailable())
    T = 700 if triton_device == "cuda" else 150
    x = torch.randn(T, 2, 32, device=triton_device)
    mask = torch.zeros(2, T, dtype=torch.bool, device=triton_device)
    mask[1, :5] = True
    outs = []
    for backend in ("torch", "fla"):
        attn = causal_attention(backend, feature_map, gate).to(triton_device)
        if triton_device == "cpu":
            monkeypatch.setattr(attn, "runs_on_triton", lambda x: backend == "fla")
        xs = x.clone().requires_grad_()
        out = attn(xs, key_padding_mask=mask)[0]
        (out[:, 0].sum() + out[5:, 1].sum()).backward()  # the real queries, as a loss that skips padding
        outs.append((out[:, 0], out[5:, 1], xs.grad))
    for ours, theirs in zip(*outs):
        assert (ours - theirs).abs().max() <= 1e-3 * theirs.abs().max().clamp(min=1.0), (ours - theirs).abs().max()

