"""python -m linear_fairseq.linearize: a softmax checkpoint turned into a linear
model's, with every shared tensor copied exactly, MemSizer's W_r mapped from the
value and output projections, and the result loadable by fairseq."""
import sys
from pathlib import Path

import pytest
import torch
from fairseq import checkpoint_utils, options
from fairseq.dataclass.utils import convert_namespace_to_omegaconf
from fairseq.models import build_model
from omegaconf import OmegaConf

import forked
from conftest import ROOT, TINY_LM, TINY_MT, make_dictionary, random_tokens
from linear_fairseq.checkpoints import allow_fairseq_checkpoints
from linear_fairseq.linearize import build_target, linearize, load_softmax, main as linearize_main, target_args

SOFTMAX = {"translation": ("transformer", TINY_MT + ["--share-all-embeddings"]),
           "language_modeling": ("transformer_lm", TINY_LM)}


def softmax_checkpoint(path: Path, task: str) -> Path:
    """A fairseq checkpoint of a tiny softmax model, laid out as fairseq-train saves it."""
    arch, args = SOFTMAX[task]
    ns = options.parse_args_and_arch(options.get_training_parser(), ["/unused", "--task", task, "--arch", arch, *args])
    cfg = convert_namespace_to_omegaconf(ns)
    d = make_dictionary(40)
    torch.manual_seed(0)
    model = build_model(cfg.model, type("Task", (), {"source_dictionary": d, "target_dictionary": d})())
    for p in model.parameters():  # away from the init, so that copies are told apart from fresh tensors
        torch.nn.init.normal_(p, std=0.1)
    history = [{"criterion_name": "CrossEntropyCriterion", "optimizer_name": "Adam", "lr_scheduler_state": {},
                "num_updates": 7}]
    torch.save({"cfg": OmegaConf.to_container(cfg), "model": model.state_dict(), "optimizer_history": history,
                "extra_state": {}, "last_optimizer_state": None}, path)
    return path


def load(path: Path):
    """The model a linearized checkpoint describes, with its weights (strict)."""
    allow_fairseq_checkpoints()  # what fairseq's commands do on loading the plugin (cli.py)
    state = checkpoint_utils.load_checkpoint_to_cpu(str(path))
    d = make_dictionary(40)
    model = build_model(state["cfg"]["model"], type("Task", (), {"source_dictionary": d, "target_dictionary": d})())
    model.load_state_dict(state["model"], strict=True)
    return model.eval(), state


def forward(model, task):
    d = make_dictionary(40)
    tokens = random_tokens(d, 3, 9, seed=1)
    with torch.no_grad():
        if task == "translation":
            return model(tokens, torch.full((3,), 9), tokens)[0]
        return model(tokens)[0]


@pytest.mark.parametrize("task,arch", [("translation", "performer_transformer"), ("language_modeling", "performer_lm")])
def test_all_roles_left_softmax_give_the_same_model(tmp_path, task, arch):
    """With every role kept as softmax the linear architecture is the softmax
    model: the converted checkpoint computes exactly what the original does."""
    src = softmax_checkpoint(tmp_path / "softmax.pt", task)
    roles = ["--decoder-self-attn", "softmax"] + (["--encoder-self-attn", "softmax", "--cross-attn", "softmax"]
                                                  if task == "translation" else [])
    out = linearize(src, tmp_path / "linear.pt", arch, roles)
    assert "initialized" not in out.split("counted once):")[-1]
    original, _ = load(src)
    converted, state = load(tmp_path / "linear.pt")
    assert state["cfg"]["model"]["_name"] == arch and state["optimizer_history"][-1]["num_updates"] == 0
    assert torch.equal(forward(original, task), forward(converted, task))


@pytest.mark.parametrize("task,arch", [("translation", "memsizer_transformer"), ("language_modeling", "memsizer_lm")])
def test_memsizer_copies_what_it_shares_and_maps_w_r(tmp_path, task, arch):
    src = softmax_checkpoint(tmp_path / "softmax.pt", task)
    out = linearize(src, tmp_path / "memsizer.pt", arch, ["--decoder-self-memory-size", "8"])
    softmax = torch.load(src, weights_only=False)["model"]
    model, state = load(tmp_path / "memsizer.pt")
    weights = model.state_dict()
    assert state["cfg"]["model"]["decoder_self_memory_size"] == 8  # the options given
    assert state["cfg"]["model"]["decoder_embed_dim"] == 32  # the sizes of the softmax model
    shared = [n for n in weights if n in softmax and softmax[n].shape == weights[n].shape]
    assert any(".fc1." in n for n in shared) and any("embed_tokens" in n for n in shared)
    for name in shared:
        assert torch.equal(weights[name], softmax[name]), name
    attn = "decoder.layers.1.self_attn"  # W_r: the last 32 rows of the stacked projection, after Phi's and W_l's
    fresh = build_target(load_softmax(src), target_args(load_softmax(src), arch, ["--decoder-self-memory-size", "8"]))
    fresh = fresh.state_dict()
    for kind in ("weight", "bias"):
        stacked, initialized = weights[f"{attn}.pkv_proj.{kind}"], fresh[f"{attn}.pkv_proj.{kind}"]
        assert stacked.shape[0] == 4 * 8 + 8 + 32 and torch.equal(stacked[:-32], initialized[:-32])
        w_r = softmax[f"{attn}.out_proj.weight"] @ softmax[f"{attn}.v_proj.{kind}"]
        torch.testing.assert_close(stacked[-32:], w_r if kind == "weight" else w_r + softmax[f"{attn}.out_proj.bias"])
    assert ("| mapped: W_r = out_proj(v_proj(x)); Phi, W_l initialized | 4 | 4,752 | decoder.layers.*.self_attn.pkv_proj |"
            in out) and "| initialized |" in out and "| left out |" in out
    assert torch.isfinite(forward(model, task)).all()
    saved = torch.load(tmp_path / "memsizer.pt", weights_only=False)["model"]  # tied tensors stay one tensor
    tied = model.decoder.output_projection.weight is model.decoder.embed_tokens.weight
    assert tied == (task == "translation")  # TINY_MT shares all embeddings, TINY_LM none
    same = saved["decoder.embed_tokens.weight"].data_ptr() == saved["decoder.output_projection.weight"].data_ptr()
    assert same == tied
    assert out.startswith(f"linearize: {SOFTMAX[task][0]} ({src}) -> {arch} (")
    # the totals count every tensor once, a tied one too: they add up to the model's own size
    totals = out.split("counted once): ")[-1].splitlines()[0]
    counted = sum(int(part.split()[0].replace(",", "")) for part in totals.split(", ") if "left out" not in part)
    unique = {t.data_ptr(): t.numel() for t in model.state_dict().values()}
    assert counted == sum(unique.values()), totals
    assert ("| tied: to " in out) == tied  # shared embeddings: one tensor, listed once as tied


def test_a_checkpoint_of_another_width_is_not_blamed_on_the_vocabulary():
    """Same vocabulary, other model width: the message names the shapes, not the data-bin."""
    from linear_fairseq.checkpoints import checkpoint_mismatch

    model = torch.nn.Module()
    model.embed_tokens = torch.nn.Embedding(40, 8)
    message = checkpoint_mismatch(model, {"embed_tokens.weight": torch.zeros(40, 16)})
    assert "vocabulary" not in message and "embed_tokens.weight: [40, 16] in the checkpoint, [40, 8] here" in message
    message = checkpoint_mismatch(model, {"embed_tokens.weight": torch.zeros(50, 8)})
    assert "the checkpoint's vocabulary has 50 entries, this task's dictionary 40" in message


def test_a_hybrid_keeps_its_softmax_layer_exactly(tmp_path):
    """--decoder-softmax-layers 0: that layer's attention is the softmax model's,
    copied; the other layer's is MemSizer's, with W_r mapped."""
    src = softmax_checkpoint(tmp_path / "softmax.pt", "language_modeling")
    out = linearize(src, tmp_path / "hybrid.pt", "memsizer_lm", ["--decoder-softmax-layers", "0"])
    softmax = torch.load(src, weights_only=False)["model"]
    weights = load(tmp_path / "hybrid.pt")[0].state_dict()
    for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
        name = f"decoder.layers.0.self_attn.{proj}.weight"
        assert torch.equal(weights[name], softmax[name]), name
        assert f"decoder.layers.1.self_attn.{proj}.weight" not in weights
    assert "decoder.layers.1.self_attn.pkv_proj.weight" in weights
    assert "decoder.layers.0.self_attn.pkv_proj.weight" not in weights
    assert "| mapped: W_r = out_proj(v_proj(x)); Phi, W_l initialized | 2 |" in out
    # the converted hybrid keeps the decoding contract: one step at a time == the whole prefix at once
    model = load(tmp_path / "hybrid.pt")[0]
    tokens = random_tokens(make_dictionary(40), 3, 9, seed=2)
    with torch.no_grad():
        full = model(tokens)[0]
        state, steps = {}, []
        for t in range(tokens.shape[1]):
            steps.append(model(tokens[:, : t + 1], incremental_state=state)[0])
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-4)


def cli(*args):
    return forked.run([sys.executable, "-m", "linear_fairseq.linearize", *map(str, args)], cwd=ROOT)


def test_bad_input_is_one_line(tmp_path, capsys):
    src = softmax_checkpoint(tmp_path / "softmax.pt", "translation")
    linearize(src, tmp_path / "memsizer.pt", "memsizer_transformer")
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    cases = [
        ((src, tmp_path / "o.pt", "--arch", "memsizer_lm"), "--arch memsizer_lm: not a linear translation architecture"),
        ((src, tmp_path / "o.pt", "--arch", "flash_transformer"), "--gau-s=128: must be <= --encoder-embed-dim=32"),
        ((tmp_path / "memsizer.pt", tmp_path / "o.pt", "--arch", "performer_transformer"),
         "holds a 'memsizer_transformer' model; linearize starts from fairseq's softmax"),
        ((tmp_path / "garbage.pt", tmp_path / "o.pt", "--arch", "memsizer_transformer"), "cannot read"),
        ((tmp_path / "missing.pt", tmp_path / "o.pt", "--arch", "memsizer_transformer"), "no such file"),
        ((src, tmp_path / "o.pt", "--arch", "memsizer_transformer", "--calibrate", 2),
         "--calibrate 2: this model has no new attention parameters to fit"),
        ((src, tmp_path / "o.pt", "--arch", "performer_transformer", "--feature-map", "t2r", "--calibrate", 2),
         "--data /unused: cannot load the softmax model's training data there"),
        ((src, tmp_path / "o.pt", "--arch", "performer_transformer", "--calibrate", -1), "--calibrate -1: must be >= 0"),
        ((src, tmp_path / "o.pt", "--arch", "performer_transformer", "--calibrate", 1, "--calibrate-steps", 0),
         "--calibrate-steps 0: must be >= 1"),
        ((src, tmp_path / "o.pt", "--arch", "performer_transformer", "--calibrate", 1, "--calibrate-lr", 0),
         "--calibrate-lr 0.0: must be > 0"),
    ]
    # the command as a user runs it, once: exit status, one line, no traceback
    r = cli(*cases[0][0])
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert cases[0][1] in r.stderr.strip().splitlines()[-1], r.stderr[-2000:]
    # every case through the same entry point in this process: it stops (SystemExit, not another
    # exception) with the message as the last line it prints
    for args, message in cases:
        with pytest.raises(SystemExit) as stop:
            linearize_main(list(map(str, args)))
        printed = stop.value.code if isinstance(stop.value.code, str) else capsys.readouterr().err
        assert stop.value.code not in (0, None) and message in printed.strip().splitlines()[-1], (args, printed)


# -- calibration: the new attention parameters fitted to the softmax attention --------------------
def batches(d, n=3):
    """Translation samples with left-padded sources and right-padded targets, as fairseq batches them."""
    out = []
    for i in range(n):
        src, tgt = random_tokens(d, 4, 10, seed=10 + i), random_tokens(d, 4, 8, seed=20 + i)
        src[1, :3] = d.pad()
        tgt[2, 5:] = d.pad()
        out.append({"net_input": {"src_tokens": src, "src_lengths": src.ne(d.pad()).sum(1),
                                  "prev_output_tokens": tgt}})
    return out


@pytest.mark.parametrize("causal", [False, True])
def test_softmax_targets_are_fairseqs_own_weights(tmp_path, causal):
    """The calibration target equals what fairseq's MultiheadAttention returns as
    its per-head weights, with a padded source and the future mask."""
    from linear_fairseq.calibrate import softmax_weights

    model, _ = load(softmax_checkpoint(tmp_path / "softmax.pt", "translation"))
    mha = model.decoder.layers[0].self_attn
    x = torch.randn(3, 7, 32)
    pad = torch.zeros(3, 7, dtype=torch.bool)
    if causal:
        pad[0, 5:] = True  # targets are padded on the right
    else:
        pad[0, :2] = True  # sources on the left
    future = torch.triu(torch.full((7, 7), float("-inf")), 1) if causal else None
    with torch.no_grad():
        _, expected = mha(x.transpose(0, 1), x.transpose(0, 1), x.transpose(0, 1), key_padding_mask=pad,
                          attn_mask=future, need_weights=True, need_head_weights=True,
                          static_kv=True)  # static_kv: fairseq's own path, not torch's fused one (no per-head weights)
        ours = softmax_weights(mha, x, x, pad, causal)
    torch.testing.assert_close(ours, expected.transpose(0, 1))


def test_calibration_fits_only_the_new_parameters_and_brings_the_weights_closer(tmp_path):
    """T2R in all three roles: the capture masks each role as the softmax model
    does, each module's KL divergence from the softmax weights drops, and every
    tensor copied from the softmax model is left exactly as it was."""
    from linear_fairseq import calibrate as cal
    from linear_fairseq.linearize import build_target, family_of, load_softmax, target_args, transfer

    src = softmax_checkpoint(tmp_path / "softmax.pt", "translation")
    state = load_softmax(src)
    args = target_args(state, "performer_transformer", ["--feature-map", "t2r", "--num-features", "8"])
    model = build_target(state, args)
    weights, how = transfer(state["model"], model, family_of("performer_transformer"))
    model.load_state_dict(weights)
    softmax_model, _ = load(src)
    targets = cal.fittable(model, {n for n, what in how.items() if what == "initialized"})
    assert sorted(targets) == sorted(f"{side}.layers.{i}.{attn}" for side, attn in
                                     (("encoder", "self_attn"), ("decoder", "self_attn"), ("decoder", "encoder_attn"))
                                     for i in range(2))
    assert all(params == ["phi.weight", "phi.bias"] for _, params in targets.values())
    d = make_dictionary(40)
    samples = batches(d)
    records = cal.capture(softmax_model, list(targets), samples)
    enc, dec, cross = (records[f"{n}"][0] for n in ("encoder.layers.0.self_attn", "decoder.layers.1.self_attn",
                                                     "decoder.layers.0.encoder_attn"))
    assert enc.target[1, :, :, :3].abs().max() == 0 and torch.equal(enc.query_padding, enc.key_padding)
    assert dec.target.triu(1).abs().max() == 0 and dec.query_padding[2, 5:].all()
    assert cross.target.shape == (4, 4, 8, 10) and cross.target[1, :, :, :3].abs().max() == 0
    start = {name: t.clone() for name, t in model.state_dict().items()}
    losses = cal.calibrate(targets, softmax_model, samples, steps=60, lr=1e-2)
    for name, (before, after) in losses.items():
        assert after < 0.7 * before, (name, before, after)
    fitted = model.state_dict()
    for name, what in how.items():
        if what == "copied":
            assert torch.equal(fitted[name], state["model"][name]), name
        elif what == "initialized":
            assert torch.equal(fitted[name], start[name]) != name.endswith((".phi.weight", ".phi.bias")), name


def test_a_local_window_starts_from_the_softmax_attention_it_joins(tmp_path):
    """--local-window is exact softmax: its projections are the softmax attention's;
    kernel attention's stacked q/k/v projection is the softmax attention's too."""
    src = softmax_checkpoint(tmp_path / "softmax.pt", "language_modeling")
    out = linearize(src, tmp_path / "local.pt", "performer_lm", ["--local-window", "4", "--short-conv", "3"])
    softmax = torch.load(src, weights_only=False)["model"]
    model, state = load(tmp_path / "local.pt")
    assert state["cfg"]["model"]["local_window"] == 4 and state["cfg"]["model"]["short_conv"] == 3
    weights = model.state_dict()
    for layer in (0, 1):
        attn = f"decoder.layers.{layer}.self_attn"
        for kind in ("weight", "bias"):
            assert torch.equal(weights[f"{attn}.window.out_proj.{kind}"], softmax[f"{attn}.out_proj.{kind}"])
            stacked = torch.cat([softmax[f"{attn}.{proj}_proj.{kind}"] for proj in "qkv"])
            assert torch.equal(weights[f"{attn}.window.qkv_proj.{kind}"], stacked)
            assert torch.equal(weights[f"{attn}.qkv_proj.{kind}"], stacked)  # kernel attention's own, likewise
    assert "| copied: decoder.layers.*.self_attn.q/k/v_proj (the window's softmax) | 4 | 6,336 |" in out  # 2 layers
    assert "| copied: q/k/v_proj stacked | 4 | 6,336 | decoder.layers.*.self_attn.qkv_proj |" in out
    assert torch.isfinite(forward(model, "language_modeling")).all()
