"""Long-run reliability through the stock fairseq CLIs (--user-dir linear_fairseq),
for every family's language model, on a small synthetic corpus made here:
bf16 training, distributed training on CPU (gloo), SIGKILL and resume,
checkpoints that do not fit, and awkward generation inputs."""
import json
import math
import os
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest
import torch

import forked
from conftest import ROOT
from test_decoding_contract import CASES as CONTRACT_CASES

pytestmark = pytest.mark.slow

USER_DIR = str(ROOT / "linear_fairseq")
FAMILIES = {
    "memsizer": ["--arch", "memsizer_lm", "--decoder-self-memory-size", "8"],
    "performer": ["--arch", "performer_lm", "--feature-map", "favor", "--num-features", "16", "--redraw-interval", "7"],
    "flash": ["--arch", "flash_lm", "--gau-s", "16", "--gau-chunk-size", "16", "--gau-scale-init", "unit"],
}
LM = (
    "--task language_modeling --tokens-per-sample 64 --sample-break-mode none --max-tokens 256 "
    "--decoder-layers 2 --decoder-embed-dim 32 --decoder-ffn-embed-dim 64 --decoder-attention-heads 4 "
    "--optimizer adam --lr 0.003 --lr-scheduler inverse_sqrt --warmup-updates 20 --criterion cross_entropy "
    "--seed 1 --num-workers 0 --cpu --log-format json --log-interval 10 --no-epoch-checkpoints --no-progress-bar"
).split()
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def command(cli, *args):
    return [f"fairseq-{cli}", *map(str, args), "--user-dir", USER_DIR]


def run(cli, *args, check=True, **kw):
    result = forked.run(command(cli, *args), env=ONE_THREAD, **kw)
    if check and result.returncode != 0:
        pytest.fail(f"fairseq-{cli} failed:\n{result.stderr[-4000:]}")
    return result


def launch(*commands):
    """Run several commands at once (one thread each): [(returncode, stdout, stderr)]."""
    files = [(tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")) for _ in commands]
    procs = [subprocess.Popen(c, stdout=out, stderr=err, text=True, env=ONE_THREAD) for c, (out, err) in zip(commands, files)]
    results = []
    for p, (out, err) in zip(procs, files):
        p.wait(timeout=600)
        out.seek(0), err.seek(0)
        results.append((p.returncode, out.read(), err.read()))
    return results


def run_together(*commands):
    """Run several commands at once; fail if any fails; their outputs (stdout + stderr)."""
    results = launch(*commands)
    failed = [f"{' '.join(c[:3])} ... failed:\n{err[-3000:]}" for c, (code, _, err) in zip(commands, results) if code]
    if failed:
        pytest.fail("\n\n".join(failed))
    return [out + err for _, out, err in results]


def train_losses(log):
    """The train_inner losses of a --log-format json log, in order."""
    losses = []
    for line in log.splitlines():
        if re.search(r"[|\[:] ?train_inner ?[|\]:]", line) and "{" in line:  # any of fairseq's log layouts
            losses.append(float(json.loads(line[line.index("{"):])["loss"]))
    return losses


def load_model_state(path):
    return torch.load(path, map_location="cpu")["model"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Sentences from a fixed random bigram model over 40 words (learnable, not trivial)."""
    root = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    words = [f"w{i}" for i in range(40)]
    follow = {w: rng.sample(words, 4) for w in words}

    def sentence():
        w, out = rng.choice(words), []
        for _ in range(rng.randint(5, 20)):
            out.append(w)
            w = rng.choice(follow[w])
        return " ".join(out)

    for split, n in (("train", 3000), ("valid", 100), ("test", 100)):
        (root / f"{split}.txt").write_text("\n".join(sentence() for _ in range(n)) + "\n")
    subprocess.run(
        ["fairseq-preprocess", "--only-source", "--trainpref", root / "train.txt", "--validpref", root / "valid.txt",
         "--testpref", root / "test.txt", "--destdir", root / "bin", "--workers", "1"],
        check=True, capture_output=True,
    )
    return root / "bin"


# -- mixed precision ----------------------------------------------------------------
# fairseq-train's --bf16 means "bf16 on a TPU" in fairseq (it sets --tpu), so
# half-precision training goes through fairseq-hydra-train and the project's own
# configs, where common.bf16 / common.fp16 are plain switches (README: Running at scale).
HYDRA_FAMILY = {
    "memsizer": ["++model.decoder_self_memory_size=8"],
    "performer": ["++model.num_features=16", "++model.redraw_interval=7"],
    "flash": ["++model.gau_s=16", "++model.gau_chunk_size=16"],
}


def hydra_train(corpus, family, out, *overrides):
    return [
        "fairseq-hydra-train", "--config-dir", str(ROOT / "configs" / "lm"), "--config-name", "austen",
        f"model=austen_{family}", f"task.data={corpus}", f"common.user_dir={USER_DIR}", "common.cpu=true",
        "common.log_format=json", "common.log_interval=10", "task.tokens_per_sample=64", "dataset.max_tokens=256",
        "optimization.max_epoch=0", "optimization.max_update=200", "lr_scheduler.warmup_updates=20",
        "optimization.lr=[0.003]", "model.decoder_layers=2", "model.decoder_embed_dim=32", "model.decoder_input_dim=32",
        "model.decoder_output_dim=32", "model.dropout=0", "++model.decoder_ffn_embed_dim=64",
        f"checkpoint.save_dir={out}", f"hydra.run.dir={out}", *HYDRA_FAMILY[family], *overrides,
    ]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_half_precision_training_tracks_fp32(corpus, tmp_path, family):
    """200 updates with common.bf16 and common.fp16 (half weights and activations,
    fp32 master weights; fp16 with the dynamic loss scaler) stay finite and
    within 0.05 nats of the fp32 run's loss over the last 50 updates."""
    # fairseq's flat fp32 master copy is CUDA-only; on CPU it keeps one per tensor
    flags = {"fp32": [], "bf16": ["common.bf16=true", "common.fp16_no_flatten_grads=true"],
             "fp16": ["common.fp16=true", "common.fp16_no_flatten_grads=true"]}
    runs = {p: hydra_train(corpus, family, tmp_path / p, *flag) for p, flag in flags.items()}
    losses = {p: train_losses(log) for p, log in zip(runs, run_together(*runs.values()))}
    fp32 = losses["fp32"]
    assert len(fp32) == 20 and fp32[-1] < fp32[0] - 1.0  # it learns
    for p in ("bf16", "fp16"):
        assert len(losses[p]) == 20 and all(math.isfinite(x) for x in losses[p]), (p, losses[p])
        gaps = [abs(a - b) for a, b in zip(fp32, losses[p])]
        assert max(gaps[-5:]) < 0.05, (p, list(zip(fp32, losses[p])))
        weights = load_model_state(tmp_path / p / "checkpoint_last.pt")
        assert all(torch.isfinite(w.float()).all() for w in weights.values() if w.is_floating_point())


# -- distributed ---------------------------------------------------------------------------
def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# fairseq saves on rank 0 only; this wrapper lets every rank save into its own
# --save-dir, so the test can compare what the two workers hold.
EVERY_RANK_SAVES = (
    "import sys; from fairseq.trainer import Trainer; "
    "Trainer.should_save_checkpoint_on_current_rank = property(lambda self: True); "
    "from fairseq_cli.train import cli_main; sys.argv[0] = 'fairseq-train'; cli_main()"
)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_two_cpu_workers_match_update_freq_2(corpus, tmp_path, family):
    args = [corpus, *FAMILIES[family], *LM, "--max-update", 20, "--dropout", 0, "--user-dir", USER_DIR]
    url = f"tcp://127.0.0.1:{free_port()}"
    workers = [
        [sys.executable, "-c", EVERY_RANK_SAVES, *map(str, args), "--save-dir", str(tmp_path / f"rank{r}"),
         "--distributed-world-size", "2", "--distributed-rank", str(r), "--distributed-init-method", url,
         "--distributed-no-spawn", "--distributed-backend", "gloo", "--ddp-backend", "legacy_ddp"]
        for r in (0, 1)
    ]
    for r in (0, 1):
        (tmp_path / f"rank{r}").mkdir()  # fairseq makes the save dir on rank 0 only
    logs = run_together(*workers)
    single = run("train", *args[:-2], "--update-freq", 2, "--save-dir", tmp_path / "single")

    rank0, rank1 = (load_model_state(tmp_path / f"rank{r}" / "checkpoint_last.pt") for r in (0, 1))
    assert rank0.keys() == rank1.keys()
    for name in rank0:  # parameters and buffers (random projections, counters) identical on both workers
        assert torch.equal(rank0[name], rank1[name]), name
    one = load_model_state(tmp_path / "single" / "checkpoint_last.pt")
    for name in one:
        assert torch.allclose(one[name].float(), rank0[name].float(), atol=1e-4), name
    dist_losses, single_losses = train_losses(logs[0]), train_losses(single.stdout + single.stderr)
    assert len(dist_losses) == len(single_losses) == 2
    assert max(abs(a - b) for a, b in zip(dist_losses, single_losses)) < 1e-3, (dist_losses, single_losses)


# -- crash and resume -----------------------------------------------------------------------
@pytest.mark.parametrize("family", ["performer", "flash"])  # the families with buffers and schedules of their own
def test_sigkill_mid_epoch_then_resume_is_exact(corpus, tmp_path, family):
    """Kill -9 after the update-20 checkpoint (mid-epoch), rerun the same command:
    it resumes from checkpoint_last.pt and ends with exactly the weights, buffers
    and eval outputs of a run that was never interrupted."""
    def cmd(save):
        return command("train", corpus, *FAMILIES[family], *LM, "--max-update", 40, "--dropout", 0.1,
                       "--save-interval-updates", 10, "--save-dir", save)

    straight = subprocess.Popen(cmd(tmp_path / "straight"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                env=ONE_THREAD)
    log = tmp_path / "killed.log"
    with open(log, "w") as out:
        victim = subprocess.Popen(cmd(tmp_path / "killed"), stdout=out, stderr=subprocess.STDOUT, env=ONE_THREAD)
        deadline = time.time() + 300
        # fairseq logs "Saved checkpoint ... (epoch 1 @ 20 updates" once checkpoint_last.pt is copied too
        while not re.search(r"Saved checkpoint \S+ \(epoch 1 @ 20 updates", log.read_text()):
            assert victim.poll() is None and time.time() < deadline, log.read_text()[-3000:]
            time.sleep(0.05)
        victim.send_signal(signal.SIGKILL)
        victim.wait()
    assert straight.wait(timeout=600) == 0
    killed_at = torch.load(tmp_path / "killed" / "checkpoint_last.pt")["optimizer_history"][-1]["num_updates"]
    assert killed_at < 40  # it really died mid-run
    resumed = run("train", *cmd(tmp_path / "killed")[1:-2])
    assert "Loaded checkpoint" in resumed.stdout + resumed.stderr

    a = load_model_state(tmp_path / "straight" / "checkpoint_last.pt")
    b = load_model_state(tmp_path / "killed" / "checkpoint_last.pt")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    # a reloaded model computes the same outputs, bit for bit
    from fairseq import checkpoint_utils

    outs = []
    for path in (tmp_path / "straight" / "checkpoint_last.pt", tmp_path / "killed" / "checkpoint_last.pt"):
        models, _ = checkpoint_utils.load_model_ensemble([str(path)])
        model = models[0].eval()
        with torch.no_grad():
            outs.append(model(torch.arange(4, 36).view(2, 16))[0])
    assert torch.equal(outs[0], outs[1])


# -- checkpoints that do not fit --------------------------------------------------------------
def trained(corpus, tmp_path, family, *extra):
    save = tmp_path / family
    run("train", corpus, *FAMILIES[family], *LM, "--max-update", 2, "--save-dir", save, *extra)
    return save


def test_resuming_into_another_architecture_says_so(corpus, tmp_path):
    save = trained(corpus, tmp_path, "performer")
    result = run("train", corpus, *FAMILIES["memsizer"], *LM, "--max-update", 4, "--save-dir", save, check=False)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "cannot load the checkpoint into MemsizerLanguageModel" in result.stderr
    assert "another architecture or attention" in result.stderr


def test_resuming_an_optimizer_state_of_other_parameters_says_so(corpus, tmp_path):
    """A run saved with another parameter layout (its optimizer state lists two
    tensors more, as a run from before FLASH's U/V/Z became one matrix does):
    resuming is refused in one line naming --reset-optimizer, with which it
    resumes from the saved weights."""
    save = trained(corpus, tmp_path, "flash")
    state = torch.load(save / "checkpoint_last.pt", weights_only=False)
    group = state["last_optimizer_state"]["param_groups"][0]
    group["params"] = group["params"] + [max(group["params"]) + 1, max(group["params"]) + 2]
    torch.save(state, save / "checkpoint_last.pt")
    result = run("train", corpus, *FAMILIES["flash"], *LM, "--max-update", 4, "--save-dir", save, check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: the optimizer state in {save / 'checkpoint_last.pt'} holds other parameters than this model (a run "
        "saved before a self-attention's q/k/v (MemSizer's Phi/W_l/W_r) or a GAU's U/V/Z became one matrix, or with "
        "other model options); add "
        "--reset-optimizer to resume from its weights with the optimizer started anew, or move it away to start afresh")
    run("train", corpus, *FAMILIES["flash"], *LM, "--max-update", 4, "--save-dir", save, "--reset-optimizer")
    assert torch.load(save / "checkpoint_last.pt", weights_only=False)["optimizer_history"][-1]["num_updates"] == 4


def test_checkpoint_with_another_vocabulary_says_so(corpus, tmp_path):
    save = trained(corpus, tmp_path, "memsizer")
    other = tmp_path / "other"
    (tmp_path / "small.txt").write_text("a b c\nb c a\n")
    subprocess.run(["fairseq-preprocess", "--only-source", "--trainpref", tmp_path / "small.txt",
                    "--validpref", tmp_path / "small.txt", "--destdir", other], check=True, capture_output=True)
    result = run("eval-lm", other, "--path", save / "checkpoint_last.pt", "--cpu", check=False)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert re.search(r"the checkpoint's vocabulary has 4\d entries, this task's dictionary [78]\b", result.stderr), result.stderr[-2000:]


def test_bad_model_options_exit_with_one_line(corpus, tmp_path):
    """Through the CLI (every option check is in test_registration_and_options.py)."""
    cases = [
        (["--arch", "memsizer_lm", "--decoder-self-memory-size", "0"], "--decoder-self-memory-size=0: must be a positive integer"),
        (["--arch", "flash_lm", "--gau-s", "64"], "--gau-s=64: must be <= --decoder-embed-dim=32"),
    ]
    results = launch(*(command("train", corpus, *LM, *args, "--max-update", 1, "--save-dir", tmp_path / str(i))
                       for i, (args, _) in enumerate(cases)))
    for (args, message), (code, _, err) in zip(cases, results):
        assert code != 0, args
        assert "Traceback" not in err, err[-3000:]
        assert message in err.strip().splitlines()[-1], err[-1000:]


# -- fairseq's training options -----------------------------------------------------------------------
def training_pass(case, *extra):
    """One training pass of a decoding-contract case's model (with `extra` flags):
    its loss, each parameter's gradient by name, and its layers, encoder's included."""
    from conftest import make_model
    from test_decoding_contract import CASES, decoder_input, left_padded_source

    arch, args, task = CASES[case]
    model, d = make_model(arch, [*args, *extra], task)
    model.train()
    prev = decoder_input(d, 2, 20)
    net = model(*left_padded_source(d, [9, 5], 0), prev) if task == "translation" else model(prev)
    loss = torch.nn.functional.cross_entropy(net[0].flatten(0, 1), prev.flatten())
    loss.backward()
    layers = [*model.decoder.layers, *getattr(getattr(model, "encoder", None), "layers", [])]
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}, layers


@pytest.mark.parametrize("case", ["flash_mt", "flash_lm", "memsizer_mt_local", "memsizer_lm_local", "performer_mt_local",
                                  "performer_lm_favor_gate"])
def test_checkpointed_activations_give_the_same_gradients(case):
    """--checkpoint-activations (layers recomputed in the backward) wraps every layer,
    encoder and decoder, and the loss and gradients are those without it."""
    (loss, grads, layers), (their_loss, their_grads, their_layers) = (
        training_pass(case, *extra) for extra in ([], ["--checkpoint-activations"]))
    assert not any(hasattr(layer, "precheckpoint_forward") for layer in layers)
    assert all(hasattr(layer, "precheckpoint_forward") for layer in their_layers)
    torch.testing.assert_close(their_loss, loss)
    assert grads.keys() == their_grads.keys() and all(g is not None for g in grads.values())
    for name, g in grads.items():
        torch.testing.assert_close(their_grads[name], g, atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("case", list(CONTRACT_CASES))
def test_every_parameter_gets_a_gradient(case):
    """One training pass gives every parameter of every model a gradient (encoder,
    decoder, local precision, hybrid softmax layers), so fairseq's DDP on several
    GPUs needs no --find-unused-parameters."""
    _, grads, _ = training_pass(case)
    assert [name for name, g in grads.items() if g is None] == []


# -- awkward inputs to generation ------------------------------------------------------------------
MT = (
    "--arch memsizer_transformer --encoder-layers 1 --decoder-layers 1 --encoder-embed-dim 32 --decoder-embed-dim 32 "
    "--encoder-ffn-embed-dim 64 --decoder-ffn-embed-dim 64 --encoder-attention-heads 4 --decoder-attention-heads 4 "
    "--max-source-positions 64 --max-target-positions 64 --share-all-embeddings --optimizer adam --lr 0.003 "
    "--criterion cross_entropy --max-tokens 512 --max-update 2 --cpu --num-workers 0 --no-progress-bar --seed 1"
).split()
TOO_LONG = " ".join(["w1"] * 100)  # the model's positions: 64


@pytest.fixture(scope="module")
def translation(tmp_path_factory):
    """A copy task whose test set holds an empty line and one longer than the model's positions;
    a memsizer_transformer trained on it for 2 updates."""
    root = tmp_path_factory.mktemp("copy")
    rng = random.Random(1)
    lines = {"train": [" ".join(f"w{rng.randrange(40)}" for _ in range(rng.randint(3, 12))) for _ in range(300)],
             "valid": ["w1 w2 w3"] * 16, "test": ["w1 w2 w3", "", TOO_LONG, "w4 w5"]}
    for split, text in lines.items():
        for lang in ("src", "tgt"):
            (root / f"{split}.{lang}").write_text("\n".join(text) + "\n")
    subprocess.run(["fairseq-preprocess", "--source-lang", "src", "--target-lang", "tgt", "--joined-dictionary",
                    "--trainpref", root / "train", "--validpref", root / "valid", "--testpref", root / "test",
                    "--destdir", root / "bin", "--workers", "1"], check=True, capture_output=True)
    run("train", root / "bin", *MT, "--save-dir", root / "ckpt")
    return root / "bin", root / "ckpt" / "checkpoint_last.pt"


def test_generate_skips_too_long_lines_when_asked_and_decodes_empty_ones(translation):
    data, ckpt = translation
    gen = [data, "--path", ckpt, "--gen-subset", "test", "--beam", 2, "--max-len-b", 5, "--cpu",
           "--required-batch-size-multiple", 1]
    skipping = run("generate", *gen, "--skip-invalid-size-inputs-valid-test")
    assert sorted(line.split("\t")[0] for line in skipping.stdout.splitlines() if line.startswith("H-")) == ["H-0", "H-1", "H-3"]
    assert "will be skipped" in skipping.stdout + skipping.stderr  # fairseq's warning
    strict = run("generate", *gen, check=False)
    assert strict.returncode != 0
    assert ("error: an input is longer than the model's positions (max_positions=(64, 64)): pass "
            "--skip-invalid-size-inputs-valid-test to skip such inputs, or shorten them") in strict.stderr.splitlines()
    assert "Traceback" not in strict.stderr


def test_interactive_with_empty_long_lines_and_with_stdin_closed(translation):
    data, ckpt = translation
    gen = [data, "--path", ckpt, "--beam", 2, "--max-len-b", 5, "--cpu", "--source-lang", "src", "--target-lang", "tgt"]
    skipping = run("interactive", *gen, "--skip-invalid-size-inputs-valid-test", input=f"w1 w2 w3\n\n{TOO_LONG}\nw4\n")
    assert [line.split("\t")[0] for line in skipping.stdout.splitlines() if line.startswith("H-")] == ["H-0", "H-1", "H-3"]
    closed = run("interactive", *gen, stdin=subprocess.DEVNULL)
    assert "Traceback" not in closed.stderr
    assert not [line for line in closed.stdout.splitlines() if line.startswith("H-")]
