"""FLASH specifics: presets, option errors, and the GAU in bf16 at long context."""
import functools

import pytest
import torch

from conftest import TINY_LM, TINY_MT, make_model, parse_model_args
from linear_fairseq.modules.flash_gau import GatedAttentionUnit
from linear_fairseq.ops.flash import CHUNK_BUFFERS, with_sum


def test_presets_double_fairseq_layers_and_use_gau_defaults():
    lm = parse_model_args("flash_lm_gpt", task="language_modeling")
    assert (lm.decoder_embed_dim, lm.decoder_layers, lm.gau_s, lm.gau_chunk_size) == (768, 24, 128, 256)
    assert (lm.gau_attention, lm.gau_norm, lm.no_rope) == ("mixed", "scalenorm", False)
    assert parse_model_args("flash_lm_wiki103", task="language_modeling").decoder_layers == 32
    mt = parse_model_args("flash_transformer_iwslt_de_en")
    assert (mt.encoder_layers, mt.decoder_layers, mt.encoder_embed_dim) == (12, 12, 512)
    assert parse_model_args("flash_transformer_wmt_en_de", ["--decoder-layers", "4"]).decoder_layers == 4


@pytest.mark.parametrize("arch,args,task", [
    ("flash_lm", TINY_LM, "language_modeling"), ("flash_transformer", TINY_MT, "translation")])
def test_rope_replaces_positional_embeddings_and_a_final_norm_follows(arch, args, task):
    model, _ = make_model(arch, args + ["--gau-s", "16"], task)
    for stack in [model.decoder] + ([model.encoder] if hasattr(model, "encoder") else []):
        assert stack.embed_positions is None and stack.layer_norm is not None
    model, _ = make_model(arch, args + ["--gau-s", "16", "--no-rope"], task)
    assert model.decoder.embed_positions is not None  # without RoPE, fairseq's positions


def test_gau_widths():
    model, _ = make_model("flash_lm", TINY_LM + ["--gau-s", "16"], "language_modeling")
    units = [m for m in model.modules() if isinstance(m, GatedAttentionUnit)]
    assert len(units) == 2 and all((u.s, u.e) == (16, 64) for u in units)  # e = 2d


@pytest.mark.parametrize("init,mean", [("paper", 0.0), ("unit", 1.0)])
def test_scale_init_of_queries_and_keys(init, mean):
    """--gau-scale-init: gamma ~ N(0, 0.02) (the paper: q.k ~ 0 and relu^2 ~ 0 at the
    start) or N(1, 0.02) (q = k = Z: attention is live from the first update)."""
    model, _ = make_model("flash_lm", TINY_LM + ["--gau-s", "16", "--gau-scale-init", init], "language_modeling")
    for unit in (m for m in model.modules() if isinstance(m, GatedAttentionUnit)):
        gamma = unit.offset_scale.gamma
        assert abs(gamma.mean().item() - mean) < 0.01 and 0.01 < gamma.std().item() < 0.03
        assert not unit.offset_scale.beta.any()


@pytest.mark.parametrize(
    "args,message",
    [
        (["--gau-chunk-size", "0"], "--gau-chunk-size=0: must be a positive integer"),
        (["--gau-s", "64"], "--gau-s=64: must be <= --decoder-embed-dim=32"),
        (["--gau-s", "15"], "--gau-s=15: must be even with RoPE"),
        (["--gau-expansion", "0"], "--gau-expansion=0.0: must be > 0"),
    ],
)
def test_bad_options_name_the_option_and_value(args, message):
    with pytest.raises(ValueError) as err:
        make_model("flash_lm", TINY_LM + args, "language_modeling")
    assert message in str(err.value)


def test_bad_encoder_width_is_named():
    with pytest.raises(ValueError, match="--gau-s=48: must be <= --encoder-embed-dim=32"):
        make_model("flash_transformer", TINY_MT + ["--gau-s", "48"])


@pytest.mark.parametrize(
    "option,value", [("--gau-attention", "sparse"), ("--gau-scale-init", "ones"), ("--gau-relu2-norm", "mean")]
)
def test_unknown_choices_are_rejected_by_the_parser(capsys, option, value):
    with pytest.raises(SystemExit):
        parse_model_args("flash_lm", [option, value], task="language_modeling")
    assert f"invalid choice: '{value}'" in capsys.readouterr().err


@pytest.mark.parametrize("mode", ["mixed", "quadratic"])
def test_bf16_gau_at_4096(mode):
    """A causal GAU branch (G=256) all in bf16 at T=4096: finite, within 2e-2 of
    fp32 (max error over the max output; the residual is left out, its bf16
    rounding would swamp the branch)."""
    torch.manual_seed(0)
    unit = GatedAttentionUnit(64, causal=True, gau_s=32, gau_expansion=2.0, gau_chunk_size=256, gau_attention=mode,
                              no_rope=False, gau_rel_pos_bias=False, gau_norm="scalenorm", dropout=0.0,
                              gau_scale_init="paper", gau_relu2_norm="chunk", gau_backend="auto").eval()
    torch.nn.init.normal_(unit.offset_scale.gamma, std=1.0)
    x = torch.randn(1, 4096, 64)
    with torch.no_grad():
        ref = unit.parallel(x, None)
        out = unit.to(torch.bfloat16).parallel(x.bfloat16(), None)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    err = (out.float() - ref).abs().max() / ref.abs().max()
    assert err < 2e-2, f"bf16 relative error {err:.3g}"


def backward_nodes(t) -> set:
    """The names of the autograd nodes t's gradient passes through."""
    seen, todo = {}, [t.grad_fn]
    while todo:
        node = todo.pop()
        if node is not None and node not in seen:
            seen[node] = node.name()
            todo += [n for n, _ in node.next_functions]
    return set(seen.values())


@pytest.mark.parametrize("causal", [True, False], ids=["decoder", "encoder"])
def test_training_takes_the_written_out_backward_where_it_applies(monkeypatch, causal):
    """A GAU over whole chunks without padding trains through ops.flash.from_z (its
    backward written out), with the output and every parameter's gradient of the
    composition it replaces; left padding over several chunks takes the composition,
    and so do right padding and a partial chunk in the (non-causal) encoder; the
    encoder's one chunk (T <= G) takes from_z padded anywhere, the decoder left-padded
    does not."""
    torch.manual_seed(0)
    unit = GatedAttentionUnit(32, causal=causal, gau_s=16, gau_expansion=2.0, gau_chunk_size=8, gau_attention="mixed",
                              no_rope=False, gau_rel_pos_bias=False, gau_norm="scalenorm", dropout=0.0,
                              gau_scale_init="unit", gau_relu2_norm="keys", gau_backend="auto")
    x = torch.randn(2, 24, 32)

    def run(h, mask=None):
        unit.zero_grad()
        out = unit.parallel(h, mask)
        out.pow(2).sum().backward()
        return out, backward_nodes(out), {n: p.grad.clone() for n, p in unit.named_parameters()}

    out, nodes, grads = run(x, torch.zeros(2, 24, dtype=torch.bool))
    assert "_FromZBackward" in nodes
    monkeypatch.setattr("linear_fairseq.ops.flash.from_z_computes", lambda *args: False)
    ref, ref_nodes, ref_grads = run(x)
    assert "_FromZBackward" not in ref_nodes
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], rtol=1e-4, atol=1e-5, msg=name)
    monkeypatch.undo()
    left, right = torch.zeros(2, 24, dtype=torch.bool), torch.zeros(2, 24, dtype=torch.bool)
    left[1, :3], right[1, 21:] = True, True
    assert "_FromZBackward" not in run(x, left)[1]
    assert ("_FromZBackward" in run(x, right)[1]) == causal and ("_FromZBackward" in run(x[:, :21])[1]) == causal
    assert ("_FromZBackward" in run(x[:, :8], left[:, :8])[1]) == (not causal)


def test_the_written_out_backward_under_autocast(monkeypatch):
    """Under autocast (fairseq's --amp; bf16 here, on the CPU) a GAU trains through
    from_z in one precision: finite, float32 parameter gradients, within bf16's
    rounding of the composition autocast runs."""
    torch.manual_seed(0)
    unit = GatedAttentionUnit(32, causal=True, gau_s=16, gau_expansion=2.0, gau_chunk_size=8, gau_attention="mixed",
                              no_rope=False, gau_rel_pos_bias=False, gau_norm="scalenorm", dropout=0.0,
                              gau_scale_init="unit", gau_relu2_norm="keys", gau_backend="auto")
    x = torch.randn(2, 32, 32)

    def run():
        unit.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = unit.parallel(x, None)
        out.float().pow(2).sum().backward()
        return out.float(), backward_nodes(out), {n: p.grad.clone() for n, p in unit.named_parameters()}

    out, nodes, grads = run()
    assert "_FromZBackward" in nodes
    monkeypatch.setattr("linear_fairseq.ops.flash.from_z_computes", lambda *args: False)
    ref, _, ref_grads = run()
    assert (out - ref).abs().max() <= 3e-2 * ref.abs().max()
    for name, g in grads.items():
        assert g.dtype == torch.float32 and torch.isfinite(g).all(), name
        assert (g - ref_grads[name]).abs().max() <= 5e-2 * ref_grads[name].abs().max(), name


@pytest.mark.parametrize("change,message", [
    ({"gau_s": 64}, "GatedAttentionUnit: gau_s=64 must be <= d=32"),
    ({"gau_s": 15}, "GatedAttentionUnit: gau_s=15 must be even with RoPE"),
    ({"gau_chunk_size": 0}, "GatedAttentionUnit: gau_chunk_size=0 must be a positive integer"),
    ({"gau_relu2_norm": "mean"}, "GatedAttentionUnit: gau_relu2_norm='mean' choose from"),
    ({"gau_backend": "triton", "gau_attention": "quadratic"},
     "GatedAttentionUnit: gau_backend='triton' decodes mixed chunk attention only"),
    ({"gau_backend": "triton", "gau_s": 15, "no_rope": True}, "GatedAttentionUnit: gau_backend='triton' needs an even"),
])
def test_the_unit_checks_the_same_rules_as_the_options(change, message):
    """The rules live once (gau_problems): built directly, the unit names its own
    argument where the model names the command-line flag."""
    from linear_fairseq.errors import ConfigError

    kwargs = dict(causal=True, gau_s=16, gau_expansion=2.0, gau_chunk_size=8, gau_attention="mixed", no_rope=False,
                  gau_rel_pos_bias=False, gau_norm="scalenorm", dropout=0.0, gau_scale_init="unit",
                  gau_relu2_norm="none", gau_backend="auto")
    GatedAttentionUnit(32, **kwargs)
    with pytest.raises(ConfigError, match=message):
        GatedAttentionUnit(32, **{**kwargs, **change})


@pytest.mark.parametrize("arch,args,task", [
    ("flash_lm", TINY_LM, "language_modeling"), ("flash_transformer", TINY_MT, "translation")])
def test_u_v_z_projections_kept_apart_load_into_the_stacked_one(arch, args, task):
    """fairseq's load path (upgrade_state_dict_named) stacks a state dict's to_uv
    and to_z into to_uvz, in the decoder's units and the encoder's: the same model."""
    model, d = make_model(arch, args + ["--gau-s", "16"], task)
    widths = {u.e: u for u in model.modules() if isinstance(u, GatedAttentionUnit)}
    (e, unit), = widths.items()
    apart = {}
    for name, tensor in model.state_dict().items():
        if ".to_uvz." in name:
            to_uv, to_z = tensor.split((2 * e, unit.s))
            apart[name.replace("to_uvz", "to_uv")], apart[name.replace("to_uvz", "to_z")] = to_uv.clone(), to_z.clone()
        else:
            apart[name] = tensor.clone()
    assert sum(".to_z.weight" in name for name in apart) == (4 if task == "translation" else 2)
    other, _ = make_model(arch, args + ["--gau-s", "16"], task, seed=1)
    other.load_state_dict(apart, strict=True)
    tokens = torch.randint(4, len(d), (2, 9), generator=torch.Generator().manual_seed(0))
    inputs = (tokens, torch.full((2,), 9), tokens) if task == "translation" else (tokens,)
    torch.testing.assert_close(other(*inputs)[0], model(*inputs)[0], rtol=0, atol=0)


@pytest.mark.parametrize("on_cpu", [True, False], ids=["cpu-reorder", "gpu-reorder"])
@pytest.mark.parametrize("relu2_norm,rel_bias,rope,dtype", [
    ("none", False, True, torch.float32), ("keys", True, True, torch.float32), ("chunk", True, False, torch.float32),
    ("none", True, True, torch.float16)])
def test_fused_decoding_step_equals_the_torch_step(monkeypatch, triton_device, relu2_norm, rel_bias, rope, dtype,
                                                   on_cpu):
    """The GAU's decoding step on ops.flash_triton's kernel (CUDA, or CPU through
    Triton's interpreter) writes the torch step's output and state at every step:
    chunks of 4 completed twice, a row whose first steps are padding, beams
    reordered halfway (as the CPU reorders, moving the chunks' filled slots, and as
    a GPU does, every slot), each relu^2 normalization, the relative bias, RoPE on
    and off, an fp16 unit (the torch step rounds U, V, Z, q and k to fp16, the
    kernel keeps fp32)."""
    from linear_fairseq.ops import common
    monkeypatch.setattr(common, "reads_back_free", lambda x: on_cpu)
    torch.manual_seed(0)
    unit = GatedAttentionUnit(32, causal=True, gau_s=16, gau_expansion=2.0, gau_chunk_size=4, gau_attention="mixed",
                              no_rope=not rope, gau_rel_pos_bias=rel_bias, gau_norm="scalenorm", dropout=0.0,
                              gau_scale_init="unit", gau_relu2_norm=relu2_norm, gau_backend="auto")
    with torch.no_grad():  # unit scale, and k = q before RoPE: positive scores, outputs that depend on every slot
        for p in (unit.offset_scale.gamma, unit.offset_scale.beta, *([unit.rel_bias] if rel_bias else [])):
            torch.nn.init.normal_(p)
        for p in (unit.offset_scale.gamma, unit.offset_scale.beta):
            p[1] = p[0]
    unit = unit.eval().to(triton_device, dtype)
    T = 11
    x = torch.randn(3, T, 32, device=triton_device, dtype=dtype)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    mask = torch.zeros(3, T, dtype=torch.bool, device=triton_device)
    mask[1, :3] = True
    states = [{}, {}]
    with torch.no_grad():
        for t in range(T):
            if t == 6:
                order = torch.tensor([2, 0, 1], device=triton_device)
                states = [unit.reorder_state(state, order) for state in states]
            outs = []
            for i, fused in enumerate((False, True)):
                monkeypatch.setattr(unit, "runs_on_triton", lambda h, fused=fused: fused)
                out, states[i] = unit.step(x[:, t], states[i], mask[:, t])
                outs.append(out)
            torch.testing.assert_close(outs[1], outs[0], rtol=tol, atol=tol)
            kept_state = with_sum(states[0])  # the torch step's has no sum before a row completes a chunk
            assert kept_state.keys() == states[1].keys()
            for name, kept in kept_state.items():
                fused = states[1][name]
                if name in CHUNK_BUFFERS:  # the torch step's hold the slots filled so far: the rest is unwritten
                    assert not fused[:, kept.shape[1]:].any(), name
                    fused = fused[:, :kept.shape[1]]
                torch.testing.assert_close(fused, kept, rtol=tol, atol=tol, msg=name)


# a small causal unit of width 32 (every option but --gau-backend)
SMALL_UNIT = dict(causal=True, gau_s=16, gau_expansion=2.0, gau_chunk_size=4, gau_attention="mixed", no_rope=False,
                  gau_rel_pos_bias=False, gau_norm="scalenorm", dropout=0.0, gau_scale_init="unit",
                  gau_relu2_norm="none")


def flash_units(device):
    """A causal GAU with --gau-backend auto told it runs on Triton, and the same unit on torch."""
    torch.manual_seed(0)
    auto, torch_unit = (GatedAttentionUnit(32, gau_backend=b, **SMALL_UNIT).to(device) for b in ("auto", "torch"))
    torch_unit.load_state_dict(auto.state_dict())
    auto.runs_on_triton = lambda h: True
    return auto, torch_unit


def test_the_fused_step_continues_a_state_the_torch_step_began(triton_device):
    """A state begun on the torch step (on the CPU its chunk buffers hold only the slots
    filled so far) and continued on the kernel (which reads all G) decodes as the torch
    step does throughout: the kernel's entry gives it all G slots first."""
    fused, torch_unit = flash_units(triton_device)
    x = torch.randn(2, 7, 32, device=triton_device)
    states = [{}, {}]
    with torch.no_grad():
        for t in range(7):
            unit = fused if t >= 2 else torch_unit  # two steps on torch: the buffers hold 2 of the G = 4 slots
            out, states[0] = unit.step(x[:, t], states[0], None)
            expected, states[1] = torch_unit.step(x[:, t], states[1], None)
            torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert states[0]["k_chunk"].shape[1] == 4


def recorded_launches(monkeypatch) -> list:
    """The tiles of each pass on FLASH's training kernels (ops.mixed_chunk_triton) from here on,
    appended as it launches."""
    from linear_fairseq.ops import mixed_chunk_triton

    launched, apply = [], mixed_chunk_triton._GatedMixedChunk.apply
    monkeypatch.setattr(mixed_chunk_triton._GatedMixedChunk, "apply", lambda *a: launched.append(a[-1]) or apply(*a))
    return launched


def test_a_gpu_the_training_kernels_do_not_fit_trains_on_torch_or_is_one_line(monkeypatch, caplog, triton_device):
    """Where no tiles of the training kernels run at the unit's sizes (ops.mixed_chunk_triton.fitted:
    a GPU that gives a block less shared memory than a wide gau_s takes), --gau-backend auto
    trains the unit on torch, to the torch pass's output, saying so in one logged line, once;
    triton is one line naming why and the ways out."""
    from linear_fairseq.errors import ConfigError
    from linear_fairseq.modules import backends
    from linear_fairseq.ops import mixed_chunk_triton

    auto, torch_unit = flash_units(triton_device)
    x = torch.randn(8, 2, 32, device=triton_device)
    monkeypatch.setattr(mixed_chunk_triton._GatedMixedChunk, "apply", lambda *a: pytest.fail("the kernels ran"))
    why = "FLASH's training kernels need shared memory: 106496, where this GPU gives a block 101376 (gau_s=16)"
    monkeypatch.setattr(mixed_chunk_triton, "fitted", lambda *a, **k: mixed_chunk_triton.Fit(None, why))
    backends.say_once.cache_clear()
    with caplog.at_level("WARNING"):
        for _ in range(2):
            torch.testing.assert_close(auto(x), torch_unit(x))
    assert [r.getMessage() for r in caplog.records] == [f"--gau-backend auto: {why}; the unit trains on torch"]
    auto.gau_backend = "triton"
    with pytest.raises(ConfigError) as err:
        auto(x)
    assert str(err.value) == (f"--gau-backend triton: {why}; a smaller --gau-s, or --gau-backend auto (then the "
                              f"unit trains on torch)")


def test_the_unit_trains_on_the_tiles_its_gpu_timed_fastest(monkeypatch, caplog, triton_device):
    """The tiles ops.mixed_chunk_triton.fitted picks for the unit's sizes (on CUDA, by timing a
    pass with each of TILES) are the ones its kernels launch with, to the torch unit's output
    and gradients, and the pick is logged once, with each candidate's time; off CUDA, fitted
    takes the first tiles and times nothing."""
    from linear_fairseq.modules import backends
    from linear_fairseq.ops import mixed_chunk_triton as M

    assert M.fitted(torch.device("cpu"), 16, 32, torch.float32, torch.float32, True, chunk_size=4,
                    relu2_norm="none") == M.Fit(M.TILES[0])
    wide = next(t for t in M.TILES if t.BLOCK_T > M.TILES[0].BLOCK_T)
    fit = M.Fit(wide, None, tuple((t, 2.0 if t != wide else 1.0) for t in M.TILES))
    monkeypatch.setattr(M, "fitted", lambda *a, **k: fit)
    launched = recorded_launches(monkeypatch)
    auto, torch_unit = flash_units(triton_device)
    x = torch.randn(20, 2, 32, device=triton_device)
    backends.say_once.cache_clear()
    with caplog.at_level("INFO", logger=backends.__name__):
        outs = [unit(x.clone().requires_grad_()) for unit in (auto, auto, torch_unit)]
    assert launched == [wide, wide]
    torch.testing.assert_close(outs[0], outs[2])
    grads = [torch.autograd.grad(out.sum(), list(unit.parameters())) for out, unit in zip(outs[1:], (auto, torch_unit))]
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want)
    timed = ", ".join(f"{t} ({2.0 if t != wide else 1.0:.2f} ms)" for t in M.TILES)
    assert [r.getMessage() for r in caplog.records] == [
        f"FLASH's training kernels (torch.float32, gau_s=16, e=64) on this GPU: {wide}, the fastest pass of {timed}"]


def test_the_fastest_tiles_are_timed_on_the_kernels_and_those_that_cannot_run_left_out(monkeypatch, triton_device):
    """ops.mixed_chunk_triton.fastest over TILES with its timer, `timed` (here a tiny pass through
    Triton's interpreter, so the times mean nothing), also under inference_mode: every
    candidate timed, the least picked; a candidate whose launch is out of resources left out,
    and where every one is, the line naming what the GPU lacks; where memory runs out while
    timing, the first candidate that can run, untimed (the kernels then train as they would
    without the timing)."""
    from linear_fairseq.ops import mixed_chunk_triton as M
    from triton.runtime.errors import OutOfResources

    apply = M._GatedMixedChunk.apply
    launched = recorded_launches(monkeypatch)
    time_of = functools.partial(M.timed, device=torch.device(triton_device), s=16, e=8, dtype=torch.float32,
                                gamma_dtype=torch.float32, rope=True, chunk_size=4, relu2_norm="none", tokens=16,
                                row=8, repeats=1)
    with torch.inference_mode():  # timed wherever the unit's first pass runs: here an evaluation's
        fit = M.fastest(M.TILES, time_of, 16)
    assert [t for t, _ in fit.ms] == list(M.TILES) and all(ms > 0 for _, ms in fit.ms)
    assert fit.tiles == min(fit.ms, key=lambda pair: pair[1])[0] and fit.why is None
    assert launched == [t for t in M.TILES for _ in range(2)]  # a first pass, then one timed

    def refused(*a):
        if a[-1] != M.TILES[1]:
            raise OutOfResources(106496, 101376, "shared memory")
        return apply(*a)

    monkeypatch.setattr(M._GatedMixedChunk, "apply", refused)
    fit = M.fastest(M.TILES, time_of, 16)
    assert fit.tiles == M.TILES[1] and [t for t, _ in fit.ms] == [M.TILES[1]]
    monkeypatch.setattr(M._GatedMixedChunk, "apply", lambda *a: refused(*a[:-1], None))
    assert M.fastest(M.TILES, time_of, 16) == M.Fit(None, "FLASH's training kernels need shared memory: 106496, "
                                                          "where this GPU gives a block 101376 (gau_s=16)")
    # no memory left to time them in beside a model: the first that is not out of resources, untimed
    for short, want in ((0, M.TILES[0]), (1, M.TILES[1])):
        def out_of(tiles, short=short):
            if tiles in M.TILES[:short]:
                raise OutOfResources(106496, 101376, "shared memory")
            raise torch.OutOfMemoryError("CUDA out of memory")

        assert M.fastest(M.TILES, out_of, 16) == M.Fit(want)


def test_gau_backend_triton_off_cuda_is_one_line_naming_why():
    """--gau-backend triton where the kernel cannot run: one line naming why and the
    way out; auto decodes on the torch step there."""
    from linear_fairseq.errors import ConfigError

    h = torch.randn(2, 32)
    with pytest.raises(ConfigError) as err:
        GatedAttentionUnit(32, gau_backend="triton", **SMALL_UNIT).eval().step(h, {}, None)
    message = str(err.value)
    assert "\n" not in message and message.startswith("--gau-backend triton: the model runs on cpu, not CUDA")
    assert "--gau-backend auto" in message
    assert not GatedAttentionUnit(32, gau_backend="auto", **SMALL_UNIT).runs_on_triton(h)


@pytest.mark.parametrize("rope,relu2_norm", [(True, "keys"), (False, "chunk")])
def test_causal_gau_trains_on_the_kernels_as_on_torch(monkeypatch, triton_device, rope, relu2_norm):
    """A causal GAU whose mixed chunk attention runs on the training kernels
    (ops.mixed_chunk_triton; CUDA, or CPU through Triton's interpreter) gives the
    torch pass's output and the gradients of its input and every parameter: a
    partial last chunk, a row padded at its end (whose real tokens' outputs are
    those of the torch pass). The kernels ran: they were called once."""
    torch.manual_seed(0)
    unit = GatedAttentionUnit(32, causal=True, gau_s=32, gau_expansion=2.0, gau_chunk_size=4, gau_attention="mixed",
                              no_rope=not rope, gau_rel_pos_bias=False, gau_norm="scalenorm", dropout=0.0,
                              gau_scale_init="unit", gau_relu2_norm=relu2_norm, gau_backend="auto").to(triton_device)
    x = torch.randn(11, 2, 32, device=triton_device)  # time-major, as fairseq's layers take it
    mask = torch.zeros(2, 11, dtype=torch.bool, device=triton_device)
    mask[1, 8:] = True
    launched = recorded_launches(monkeypatch)
    results = []
    for fused in (False, True):
        monkeypatch.setattr(unit, "runs_on_triton", lambda h, fused=fused: fused)
        unit.zero_grad(set_to_none=True)
        xs = x.clone().requires_grad_()
        out = unit(xs, mask)
        (out * ~mask.t()[..., None]).square().sum().backward()
        results.append((out * ~mask.t()[..., None], xs.grad, *(p.grad for p in unit.parameters())))
    assert len(launched) == 1
    for got, want in zip(results[1], results[0]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
