"""python -m linear_fairseq.linearize: a softmax checkpoint turned into a linear
model's, with every shared tensor copied exactly, MemSizer's W_r mapped from the
value and output projections, and the result loadable by fairseq."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fairseq import checkpoint_utils, options
from fairseq.dataclass.utils import convert_namespace_to_omegaconf
from fairseq.models import build_model
from omegaconf import OmegaConf

from conftest import ROOT, TINY_LM, TINY_MT, make_dictionary, random_tokens
from linear_fairseq.linearize import linearize

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
    assert "initialized" not in out.split("parameters:")[-1]
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
    attn = "decoder.layers.1.self_attn"
    assert torch.allclose(weights[f"{attn}.w_r.weight"],
                          softmax[f"{attn}.out_proj.weight"] @ softmax[f"{attn}.v_proj.weight"])
    assert torch.allclose(weights[f"{attn}.w_r.bias"], softmax[f"{attn}.out_proj.weight"] @ softmax[f"{attn}.v_proj.bias"]
                          + softmax[f"{attn}.out_proj.bias"])
    assert "| mapped: W_r = out_proj(v_proj(x)) | 4 | 2,112 | decoder.layers.*.self_attn.w_r |" in out and "| initialized |" in out and "| left out |" in out
    assert torch.isfinite(forward(model, task)).all()
    assert out.startswith(f"linearize: {SOFTMAX[task][0]} ({src}) -> {arch} (")


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
    assert "decoder.layers.1.self_attn.w_r.weight" in weights and "decoder.layers.0.self_attn.w_r.weight" not in weights
    assert "| mapped: W_r = out_proj(v_proj(x)) | 2 |" in out
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
    return subprocess.run([sys.executable, "-m", "linear_fairseq.linearize", *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT)


def test_bad_input_is_one_line(tmp_path):
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
    ]
    for args, message in cases:
        r = cli(*args)
        assert r.returncode != 0 and message in r.stderr, (args, r.stderr[-2000:])
        assert "Traceback" not in r.stderr and message in r.stderr.strip().splitlines()[-1], r.stderr[-2000:]
