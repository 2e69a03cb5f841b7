"""End to end through the stock fairseq CLIs with --user-dir linear_fairseq, on
slices of the real data beside the project (skipped when it is absent). The
commands fork from a server that has imported fairseq (tests/forked.py), but
for the test of what a plain command prints."""
import math
import os
import re
import subprocess
import sys

import pytest
import torch

import forked
from conftest import ROOT, require_data
from scripts.scoring import bleu_chrf, read_hypotheses, read_references

pytestmark = pytest.mark.slow

TINY_MT = (
    "--encoder-layers 1 --decoder-layers 2 "
    "--encoder-embed-dim 64 --decoder-embed-dim 64 --encoder-ffn-embed-dim 128 --decoder-ffn-embed-dim 128 "
    "--encoder-attention-heads 4 --decoder-attention-heads 4 --share-all-embeddings "
    "--optimizer adam --lr 3e-3 --lr-scheduler inverse_sqrt --warmup-updates 10 "
    "--criterion label_smoothed_cross_entropy --label-smoothing 0.1 --dropout 0.1 "
    "--max-tokens 2048 --seed 1 --no-epoch-checkpoints --log-format simple --log-interval 5 --num-workers 0"
).split()


def fairseq(cli, *args, check=True):
    cmd = [f"fairseq-{cli}", *map(str, args), "--user-dir", str(ROOT / "linear_fairseq")]
    result = forked.run(cmd)
    if check and result.returncode != 0:
        pytest.fail(f"fairseq-{cli} failed:\n{result.stderr[-4000:]}")
    return result


def num_updates(checkpoint):
    return torch.load(checkpoint)["optimizer_history"][-1]["num_updates"]


@pytest.fixture(scope="module")
def multi30k(tmp_path_factory):
    raw = require_data("multi30k")
    out = tmp_path_factory.mktemp("multi30k")
    cmd = [sys.executable, ROOT / "data-prep" / "multi30k.py", "--raw", raw, "--out", out, "--limit", "4000", "--eval-limit", "200", "--vocab", "1000"]
    subprocess.run(list(map(str, cmd)), check=True, capture_output=True)
    return out


def test_memsizer_translation_train_generate_score_resume(multi30k, tmp_path):
    data, save = multi30k / "bin", tmp_path / "ckpt"
    train = fairseq("train", data, "--arch", "memsizer_transformer", *TINY_MT, "--max-update", 30, "--save-dir", save)
    assert num_updates(save / "checkpoint_last.pt") == 30
    losses = [float(x) for x in re.findall(r"train_inner \| .*? loss=([\d.]+)", train.stderr + train.stdout)]
    assert len(losses) == 6 and losses[-1] < losses[0] - 1.0, losses  # it learns

    gen = fairseq(
        "generate", data, "--path", save / "checkpoint_last.pt", "--gen-subset", "valid",
        "--beam", 4, "--batch-size", 128, "--max-len-a", 1.2, "--max-len-b", 10,
        "--post-process", "sentencepiece", "--required-batch-size-multiple", 1,
    )
    hyps = read_hypotheses(gen.stdout)
    refs = read_references(multi30k / "raw" / "valid.en")
    assert len(hyps) == len(refs) == 200
    scores = bleu_chrf(hyps, refs)
    assert math.isfinite(scores["bleu"]) and scores["bleu"] >= 0 and scores["chrf"] > 0

    # the same command with a later --max-update resumes from checkpoint_last.pt
    resumed = fairseq("train", data, "--arch", "memsizer_transformer", *TINY_MT, "--max-update", 40, "--save-dir", save)
    assert "Loaded checkpoint" in resumed.stderr + resumed.stdout
    assert num_updates(save / "checkpoint_last.pt") == 40

    # our checkpoints hold no pickled Namespace: bare torch.load (weights_only) reads them
    bare = subprocess.run(
        [sys.executable, "-c", f"import torch; torch.load({str(save / 'checkpoint_last.pt')!r})"],
        capture_output=True, text=True,
    )
    assert bare.returncode == 0, bare.stderr[-2000:]

    # fairseq-interactive on sentencepiece pieces
    spm = (multi30k / "spm" / "test.de").read_text().splitlines()[:2]
    inter = forked.run(
        ["fairseq-interactive", str(data), "--path", str(save / "checkpoint_last.pt"), "--beam", "2",
         "--source-lang", "de", "--target-lang", "en", "--user-dir", str(ROOT / "linear_fairseq")],
        input="\n".join(spm) + "\n",
    )
    assert inter.returncode == 0, inter.stderr[-3000:]
    assert sum(line.startswith("H-") for line in inter.stdout.splitlines()) == 2

    # ... and on raw text, as the README shows it: sentencepiece applied by fairseq
    raw = (multi30k / "raw" / "test.de").read_text().splitlines()[:2]
    inter = forked.run(
        ["fairseq-interactive", str(data), "--path", str(save / "checkpoint_last.pt"), "--beam", "2",
         "--source-lang", "de", "--target-lang", "en", "--bpe", "sentencepiece",
         "--sentencepiece-model", str(multi30k / "spm.model"), "--user-dir", str(ROOT / "linear_fairseq")],
        input="\n".join(raw) + "\n",
    )
    assert inter.returncode == 0, inter.stderr[-3000:]
    sources = [line for line in inter.stdout.splitlines() if line.startswith("S-")]
    assert len(sources) == 2 and not any("<unk>" in line for line in sources)
    assert sum(line.startswith("D-") for line in inter.stdout.splitlines()) == 2

    # the Python API: load, translate raw text
    from linear_fairseq.models.memsizer import MemsizerTransformerModel

    hub = MemsizerTransformerModel.from_pretrained(
        str(save), "checkpoint_last.pt", data_name_or_path=str(data),
        bpe="sentencepiece", sentencepiece_model=str(multi30k / "spm.model"),
    )
    out = hub.translate(raw[0], beam=2)
    assert isinstance(out, str) and out and "▁" not in out


@pytest.mark.parametrize(
    "arch_args",
    # favor and flash go through fairseq-hydra-train/-generate in test_reproduce.py and
    # test_reliability.py; t2r is the feature map with learned parameters
    [["performer_transformer", "--feature-map", "t2r", "--redraw-interval", "4"]],
    ids=["performer-t2r"],
)
def test_family_train_and_generate(multi30k, tmp_path, arch_args):
    data, save = multi30k / "bin", tmp_path / "ckpt"
    fairseq("train", data, "--arch", *arch_args, *TINY_MT, "--max-update", 10, "--save-dir", save)
    gen = fairseq(
        "generate", data, "--path", save / "checkpoint_last.pt", "--gen-subset", "test", "--beam", 4,
        "--batch-size", 100, "--max-len-a", 1.2, "--max-len-b", 10, "--post-process", "sentencepiece",
        "--required-batch-size-multiple", 1,
    )
    hyps = read_hypotheses(gen.stdout)
    assert len(hyps) == 200
    assert bleu_chrf(hyps, read_references(multi30k / "raw" / "test.en"))["chrf"] > 0


def test_linearize_a_trained_transformer_then_finetune_and_generate(multi30k, tmp_path):
    """The linearize path as the README shows it: fairseq-train a softmax
    transformer, convert it, fine-tune with --finetune-from-model, decode."""
    data = multi30k / "bin"
    fairseq("train", data, "--arch", "transformer", *TINY_MT, "--max-update", 12, "--save-dir", tmp_path / "softmax")
    memsizer = ["--arch", "memsizer_transformer", "--decoder-self-memory-size", "4", "--cross-attn", "softmax"]
    r = forked.run([sys.executable, "-m", "linear_fairseq.linearize", tmp_path / "softmax" / "checkpoint_last.pt",
                    tmp_path / "linear.pt", *memsizer])
    assert r.returncode == 0 and "| mapped: W_r = out_proj(v_proj(x)); Phi, W_l initialized |" in r.stdout, r.stderr[-3000:]
    # T2R's recipe: the attention alone first, then everything
    fairseq("train", data, *memsizer, *TINY_MT, "--max-update", 4, "--save-dir", tmp_path / "attn",
            "--finetune-from-model", tmp_path / "linear.pt", "--train-attention-only")
    before, after = (torch.load(p, weights_only=False)["model"] for p in (tmp_path / "linear.pt", tmp_path / "attn" / "checkpoint_last.pt"))
    moved = {name for name in before if not torch.equal(before[name], after[name])}
    assert moved and all(".self_attn." in name for name in moved), sorted(moved)  # decoder self: the only MemSizer role
    fairseq("train", data, *memsizer, *TINY_MT, "--max-update", 6, "--save-dir", tmp_path / "ft",
            "--finetune-from-model", tmp_path / "attn" / "checkpoint_last.pt")
    assert num_updates(tmp_path / "ft" / "checkpoint_last.pt") == 6  # a fresh run from the converted weights
    final = torch.load(tmp_path / "ft" / "checkpoint_last.pt", weights_only=False)["model"]
    assert not torch.equal(final["decoder.layers.0.fc1.weight"], before["decoder.layers.0.fc1.weight"])
    gen = fairseq("generate", data, "--path", tmp_path / "linear.pt", "--gen-subset", "valid", "--beam", 2,
                  "--batch-size", 100, "--max-len-b", 10, "--post-process", "sentencepiece",
                  "--required-batch-size-multiple", 1)
    assert len(read_hypotheses(gen.stdout)) == 200
    # T2R with its feature map first fitted to the softmax attention on the training data
    t2r = ["--arch", "performer_transformer", "--feature-map", "t2r", "--num-features", "8", "--cross-attn", "softmax"]
    r = forked.run([sys.executable, "-m", "linear_fairseq.linearize", tmp_path / "softmax" / "checkpoint_last.pt",
                    tmp_path / "t2r.pt", *t2r, "--calibrate", "2", "--calibrate-steps", "20"])
    assert r.returncode == 0 and "| calibrated | 4 |" in r.stdout, r.stderr[-3000:]
    kl = [line.split("|")[2:4] for line in r.stdout.splitlines() if line.startswith("| decoder.layers.")]
    assert len(kl) == 2 and all(float(after) < float(before) for before, after in kl), r.stdout
    gen = fairseq("generate", data, "--path", tmp_path / "t2r.pt", "--gen-subset", "valid", "--beam", 2,
                  "--batch-size", 100, "--max-len-b", 10, "--post-process", "sentencepiece",
                  "--required-batch-size-multiple", 1)
    assert len(read_hypotheses(gen.stdout)) == 200


def test_demo_without_data_offline_says_so_and_fails(tmp_path):
    """No --data and no way to download: a clear message and a non-zero exit, before any training."""
    env = {**os.environ, "MULTI30K_URL": "http://127.0.0.1:9/multi30k"}  # nothing listens on port 9
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "reproduce.py"), "mt", "--demo", "--work", str(tmp_path)],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert result.returncode != 0
    assert "cannot download http://127.0.0.1:9/multi30k/train.de.gz" in result.stderr
    assert "Offline? Pass --raw DIR" in result.stderr
    assert not (tmp_path / "checkpoints").exists()


TINY_LM = (
    "--task language_modeling --decoder-layers 2 --decoder-embed-dim 32 --decoder-ffn-embed-dim 64 "
    "--decoder-attention-heads 4 --share-decoder-input-output-embed --tokens-per-sample 64 "
    "--optimizer adam --lr 3e-3 --lr-scheduler inverse_sqrt --warmup-updates 5 --dropout 0 "
    "--max-tokens 1024 --seed 1 --no-epoch-checkpoints --log-format simple --num-workers 0"
).split()


@pytest.fixture(scope="module")
def austen_lm(tmp_path_factory):
    """A tiny MemSizer LM trained for 10 updates with --sample-break-mode eos
    (fairseq's np.compat path under numpy 2), shared by the LM inference tests."""
    raw = require_data("austen")
    out = tmp_path_factory.mktemp("austen")
    cmd = [sys.executable, ROOT / "data-prep" / "austen.py", "--raw", raw, "--out", out, "--limit", "400",
           "--eval-limit", "40", "--vocab", "500"]
    subprocess.run(list(map(str, cmd)), check=True, capture_output=True)
    save = out / "ckpt"
    fairseq("train", out / "bin", "--arch", "memsizer_lm", *TINY_LM, "--sample-break-mode", "eos",
            "--skip-invalid-size-inputs-valid-test", "--max-update", 10, "--save-dir", save)
    return out, save / "checkpoint_last.pt"


def test_lm_interactive_decoding(austen_lm):
    """Raw text in, as the README shows it (sentencepiece applied by fairseq)."""
    data, ckpt = austen_lm
    prompts = [" ".join(line.split()[:5]) for line in (data / "raw" / "test.txt").read_text().splitlines()[:2]]
    r = forked.run(
        ["fairseq-interactive", str(data / "bin"), "--task", "language_modeling", "--path", str(ckpt),
         "--bpe", "sentencepiece", "--sentencepiece-model", str(data / "spm.model"),
         "--beam", "1", "--sampling", "--max-len-b", "8", "--seed", "1", "--user-dir", str(ROOT / "linear_fairseq")],
        input="\n".join(prompts) + "\n",
    )
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.splitlines()
    assert sum(line.startswith("D-") for line in lines) == 2
    assert not any("<unk>" in line for line in lines if line.startswith("S-"))


def test_an_input_longer_than_the_model_is_one_line(austen_lm):
    """fairseq-interactive stops at a line the model cannot take: one line says why and which flag skips it."""
    data, ckpt = austen_lm
    r = forked.run(
        ["fairseq-interactive", str(data / "bin"), "--task", "language_modeling", "--path", str(ckpt),
         "--beam", "1", "--max-len-b", "4", "--user-dir", str(ROOT / "linear_fairseq")],
        input=" ".join(["the"] * 300) + "\n",
    )
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert ("error: an input is longer than the model's positions (max_positions=64): pass "
            "--skip-invalid-size-inputs-valid-test to skip such inputs, or shorten them") in r.stderr.splitlines()


def test_lm_hub_score_and_sample(austen_lm):
    """The Python API as the README shows it: load, score a sentence, sample a continuation."""
    from fairseq.models.transformer_lm import TransformerLanguageModel

    import linear_fairseq  # noqa: F401  registers the models
    from linear_fairseq.models.memsizer import MemsizerLanguageModel

    data, ckpt = austen_lm
    lm = MemsizerLanguageModel.from_pretrained(str(ckpt.parent), ckpt.name, data_name_or_path=str(data / "bin"),
                                               bpe="sentencepiece", sentencepiece_model=str(data / "spm.model"))
    assert isinstance(lm.models[0], TransformerLanguageModel)
    sentence = " ".join((data / "raw" / "test.txt").read_text().split()[:12])
    scored = lm.score(sentence)
    assert scored["positional_scores"].shape[0] == len(lm.encode(sentence)) - 1
    assert torch.isfinite(scored["positional_scores"]).all()
    torch.manual_seed(0)
    prompt = " ".join(sentence.split()[:3])
    text = lm.sample(prompt, beam=1, sampling=True, max_len_b=40)
    assert text.startswith(prompt) and len(text) > len(prompt)


def test_hydra_train_with_relative_paths_as_the_docs_show(multi30k, tmp_path):
    """docs/reproducing.md's fairseq-hydra-train shape, run from a data folder with
    relative task.data and save_dir: the configs keep hydra from changing directory."""
    (tmp_path / "data-bin").symlink_to(multi30k)
    r = forked.run(
        ["fairseq-hydra-train", "--config-dir", str(ROOT / "configs" / "mt"), "--config-name", "multi30k",
         "model=multi30k_memsizer", "task.data=data-bin/bin", f"common.user_dir={ROOT / 'linear_fairseq'}",
         "checkpoint.save_dir=ckpt", "optimization.max_epoch=0", "optimization.max_update=2",
         "model.encoder_layers=1", "model.decoder_layers=1", "model.encoder_embed_dim=32", "model.decoder_embed_dim=32"],
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert num_updates(tmp_path / "ckpt" / "checkpoint_last.pt") == 2


def test_checkpoint_for_the_other_kind_of_task_is_refused_in_one_line(multi30k, austen_lm, tiny_mt, tmp_path):
    """An LM checkpoint given to translation decoding, or a translation checkpoint
    to fairseq-eval-lm: one line naming the mismatch, not garbage or a traceback."""
    _, lm_ckpt = austen_lm
    r = fairseq("generate", multi30k / "bin", "--path", lm_ckpt, "--gen-subset", "valid", "--max-sentences", 8,
                check=False)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "MemsizerLanguageModel is a language model: pass --task language_modeling" in r.stderr.splitlines()[-1]
    data, _ = austen_lm
    r = fairseq("eval-lm", data / "bin", "--path", tiny_mt(*MEMSIZER_PAPER), "--max-tokens", 512, check=False)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "is a translation (encoder-decoder) model" in r.stderr.splitlines()[-1]
    # fairseq's own softmax transformer too
    fairseq("train", multi30k / "bin", "--arch", "transformer", *TINY_MT, "--max-update", 1, "--save-dir", tmp_path / "sm")
    r = fairseq("eval-lm", data / "bin", "--path", tmp_path / "sm" / "checkpoint_last.pt", "--max-tokens", 512,
                check=False)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert r.stderr.splitlines()[-1] == (f"error: {tmp_path / 'sm' / 'checkpoint_last.pt'} is a translation "
                                         "(encoder-decoder) model, and fairseq-eval-lm scores language models: "
                                         "decode it with fairseq-generate")


def test_unreadable_checkpoint_is_named(multi30k, tmp_path):
    for name, content in (("empty.pt", b""), ("cut.pt", b"PK\x03\x04" + b"\0" * 500)):
        (tmp_path / name).write_bytes(content)
        r = fairseq("generate", multi30k / "bin", "--path", tmp_path / name, check=False)
        assert r.returncode == 1 and "Traceback" not in r.stderr
        assert f"cannot read {tmp_path / name}: the file is empty or truncated" in r.stderr.splitlines()[-1]


@pytest.fixture(scope="module")
def tiny_mt(multi30k, tmp_path_factory):
    """setup flags -> the last checkpoint of a tiny translation model trained 3
    updates with them, once a module; two layers a stack, with LayerDrop, so
    that the same models serve layer pruning at inference."""
    cache = {}

    def trained(*setup):
        if setup not in cache:
            save = tmp_path_factory.mktemp("tiny_mt")
            fairseq("train", multi30k / "bin", *setup, *TINY_MT, "--encoder-layers", 2, "--encoder-layerdrop", 0.2,
                    "--decoder-layerdrop", 0.2, "--max-update", 3, "--save-dir", save)
            cache[setup] = save / "checkpoint_last.pt"
        return cache[setup]
    return trained


MEMSIZER_PAPER = ("--arch", "memsizer_transformer")  # its paper placement: slot cross-attention
KERNEL = ("--arch", "performer_transformer")
FLASH = ("--arch", "flash_transformer", "--gau-s", 16, "--gau-chunk-size", 8)


@pytest.mark.parametrize("setup", [MEMSIZER_PAPER, KERNEL, FLASH], ids=["memsizer", "performer", "flash"])
def test_layerdrop_pruning_at_inference(multi30k, tiny_mt, setup):
    """Trained with LayerDrop, decoded with one layer of each stack kept
    (--model-overrides, as for fairseq's transformer): a smaller model that decodes."""
    keep = "{'encoder_layers_to_keep':'1','decoder_layers_to_keep':'0'}"
    gen = fairseq("generate", multi30k / "bin", "--path", tiny_mt(*setup), "--gen-subset", "valid", "--beam", 2,
                  "--max-len-b", 5, "--batch-size", 64, "--model-overrides", keep)
    assert "Pruning model to specified layer configuration" in gen.stderr + gen.stdout
    assert len(read_hypotheses(gen.stdout)) == 200


ALIGNED = {"kernel-cross": KERNEL,
           "flash-softmax-cross": ("--arch", "flash_transformer", "--gau-s", 16, "--cross-attn", "softmax"),
           "flash-kernel-cross": FLASH,
           "memsizer-softmax-cross": ("--arch", "memsizer_transformer", "--cross-attn", "softmax")}


@pytest.mark.parametrize("model", [*ALIGNED, "memsizer-slots"])
def test_print_alignment(multi30k, tiny_mt, model):
    """fairseq-generate --print-alignment: every cross-attention with weights over
    source positions gives one alignment per hypothesis (a source position for
    each target token); MemSizer's slot memory says in one line that it has none."""
    checkpoint = tiny_mt(*ALIGNED.get(model, MEMSIZER_PAPER))
    gen = fairseq("generate", multi30k / "bin", "--path", checkpoint, "--gen-subset", "valid", "--beam", 2,
                  "--max-len-b", 6, "--batch-size", 64, "--print-alignment", check=False)
    if model == "memsizer-slots":
        assert gen.returncode == 1 and "Traceback" not in gen.stderr
        assert gen.stderr.splitlines()[-1].startswith("error: --print-alignment: MemSizer's cross-attention reads "
                                                      "k memory slots, not source positions")
        return
    assert gen.returncode == 0, gen.stderr[-3000:]
    hyps = {line.split("\t")[0][2:]: line.split("\t")[2] for line in gen.stdout.splitlines() if line.startswith("H-")}
    sources = {line.split("\t")[0][2:]: line.split("\t")[1] for line in gen.stdout.splitlines() if line.startswith("S-")}
    aligned = {line.split("\t")[0][2:]: line.split("\t")[1] for line in gen.stdout.splitlines() if line.startswith("A-")}
    assert len(hyps) == 200 and aligned.keys() == hyps.keys()
    for i, pairs in aligned.items():
        pairs = [tuple(map(int, p.split("-"))) for p in pairs.split()]
        assert [t for _, t in pairs] == list(range(len(hyps[i].split())))  # one source position per target token
        assert all(0 <= s <= len(sources[i].split()) for s, _ in pairs)  # within the source (its end included)


def test_plain_commands_print_no_deprecation_warning_nor_config_dump(austen_lm, tmp_path):
    """fairseq-train and fairseq-eval-lm of a plugin model: none of the warnings
    fairseq's use of hydra and torch raises, no configuration dump; both back
    with LINEAR_FAIRSEQ_VERBOSE=1."""
    data, ckpt = austen_lm
    train = ["fairseq-train", str(data / "bin"), "--user-dir", str(ROOT / "linear_fairseq"), "--arch", "memsizer_lm",
             *TINY_LM, "--max-update", 2, "--save-dir", str(tmp_path / "ckpt")]
    evaluate = ["fairseq-eval-lm", str(data / "bin"), "--user-dir", str(ROOT / "linear_fairseq"), "--path", str(ckpt),
                "--max-tokens", "512"]
    for cmd in (train, evaluate):
        r = subprocess.run(list(map(str, cmd)), capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-3000:]
        assert "Warning" not in r.stderr + r.stdout, (r.stderr + r.stdout)[:3000]
        assert "{'_name'" not in r.stderr + r.stdout
    loud = subprocess.run(list(map(str, train)), capture_output=True, text=True,
                          env={**os.environ, "LINEAR_FAIRSEQ_VERBOSE": "1"})
    assert "is no longer experimental" in loud.stderr and "{'_name'" in loud.stderr + loud.stdout


def test_a_real_checkpoint_cut_short_or_missing_is_named(austen_lm, tmp_path):
    """A trained checkpoint cut at a few kB, 10 kB and half its size, given to
    fairseq-eval-lm and resumed by fairseq-train; a path that does not exist."""
    data, ckpt = austen_lm
    whole = ckpt.read_bytes()
    for size in (3_000, 10_000, len(whole) // 2):
        cut = tmp_path / f"cut{size}.pt"
        cut.write_bytes(whole[:size])
        r = fairseq("eval-lm", data / "bin", "--path", cut, "--max-tokens", 512, check=False)
        assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
        assert r.stderr.splitlines()[-1].startswith(f"error: cannot read {cut}: the file is empty or truncated")
        save = tmp_path / f"save{size}"
        save.mkdir()
        (save / "checkpoint_last.pt").write_bytes(whole[:size])
        r = fairseq("train", data / "bin", "--arch", "memsizer_lm", *TINY_LM, "--max-update", 1, "--save-dir", save,
                    check=False)
        assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
        assert f"cannot read {save / 'checkpoint_last.pt'}: the file is empty or truncated" in r.stderr.splitlines()[-1]
        assert "--restore-file" in r.stderr.splitlines()[-1]
    r = fairseq("eval-lm", data / "bin", "--path", tmp_path / "none.pt", check=False)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.splitlines()[-1] == (f"error: {tmp_path / 'none.pt'}: no such checkpoint file; check --path "
                                         "(a relative path is taken from where the command runs)")


@pytest.mark.parametrize("model,override,message", [
    ("memsizer", "model.decoder_self_memory_size=0", "--decoder-self-memory-size=0: must be a positive integer"),
    ("performer", "model.feature_map=foo", "--feature-map='foo': choose from elu, favor, rfa, t2r"),
    ("memsizer", "model.cross_attn=performer", "--cross-attn='performer': choose from softmax, memsizer"),
    ("flash", "model.gau_relu2_norm=mean", "--gau-relu2-norm='mean': choose from keys, chunk, none"),
])
def test_bad_value_through_hydra_is_one_line(multi30k, tmp_path, model, override, message):
    r = forked.run(
        ["fairseq-hydra-train", "--config-dir", str(ROOT / "configs" / "mt"), "--config-name", "multi30k",
         f"model=multi30k_{model}", f"task.data={multi30k / 'bin'}", f"common.user_dir={ROOT / 'linear_fairseq'}",
         f"checkpoint.save_dir={tmp_path / 'ckpt'}", override],
        cwd=tmp_path,
    )
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert message in r.stderr.splitlines()
