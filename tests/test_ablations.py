"""reproduce.py --ablations end to end at smoke scale: grid rows and seeds, runs
kept across calls, rows started from another row's linearized checkpoint."""
import csv
import re
import subprocess

import pytest

from conftest import ROOT, require_data
from test_reproduce import finite, reproduce

pytestmark = pytest.mark.slow


def test_ablations_smoke_writes_rows_seeds_and_reuses_recorded_runs(tmp_path):
    """--ablations: the grid's rows (here two) with the headline row on both seeds,
    scored on the validation set; a second call keeps the recorded runs."""
    raw = require_data("multi30k")
    rows = "softmax,flash-keys-paper-init"
    out = reproduce("mt", raw, tmp_path, "--ablations", "--rows", rows)
    assert re.search(r"\[3/3, \d+ min, about \d+ min left\] softmax, seed 2", out)
    md = (tmp_path / "work" / "results" / "ablations-mt-smoke.md").read_text()
    with open(tmp_path / "work" / "results" / "ablations-mt-smoke.csv") as f:
        table = {r["row"]: r for r in csv.DictReader(f)}
    assert set(table) == {"softmax", "flash-keys-paper-init"} and "| softmax | transformer |" in md
    # the header's command is the whole grid's (recorded runs are kept); this run's follows
    assert re.search(r"Command: `bash scripts/reproduce_mt.sh (?:(?!--rows)[^`])*--ablations` "
                     r"\(this run: `[^`]*--rows softmax,flash-keys-paper-init`\)", md), md[:600]
    assert table["softmax"]["seeds"].count("/") == 1 and table["flash-keys-paper-init"]["seeds"].count("/") == 0
    for r in table.values():
        assert 0 <= float(r["bleu"]) <= 100 and finite(r["valid loss"]) and int(r["updates"]) == 16
    with open(tmp_path / "work" / "results" / "ablations-mt-smoke.runs.csv") as f:
        runs = list(csv.DictReader(f))
    flash = next(r for r in runs if r["row"] == "flash-keys-paper-init")
    assert "++model.gau_relu2_norm=keys" in flash["overrides"] and "common.seed=1" in flash["overrides"]
    log = (tmp_path / "work" / "runs" / "multi30k" / "flash-keys-paper-init-s1" / "train.log").read_text()
    assert "'gau_relu2_norm': 'keys'" in log and "'gau_scale_init': 'paper'" in log
    # --seeds 2 keeps the grid's rule: the second seed is the headline rows' only
    again = reproduce("mt", raw, tmp_path, "--ablations", "--rows", rows, "--seeds", "2")
    assert "softmax, seed 2: in ablations-mt-smoke.runs.csv; kept" in again and "training" not in again
    assert "seed 1" not in again and "flash-keys-paper-init, seed" not in again
    # --fresh retrains the rows asked for and leaves the others' runs in the table
    fresh = reproduce("mt", raw, tmp_path, "--ablations", "--rows", "flash-keys-paper-init", "--fresh")
    assert "flash-keys-paper-init, seed 1: bleu" in fresh and "softmax, seed" not in fresh
    with open(tmp_path / "work" / "results" / "ablations-mt-smoke.runs.csv") as f:
        after = list(csv.DictReader(f))
    assert sorted((r["row"], r["seed"]) for r in after) == sorted((r["row"], r["seed"]) for r in runs)
    assert [r for r in after if r["row"] == "softmax"] == [r for r in runs if r["row"] == "softmax"]


def test_unknown_ablation_row_is_named(tmp_path):
    r = subprocess.run(["bash", str(ROOT / "scripts" / "reproduce_mt.sh"), "--ablations", "--rows", "softmax,nope",
                        "--scale", "smoke", "--raw", str(tmp_path), "--work", str(tmp_path / "w")],
                       capture_output=True, text=True)
    assert r.returncode != 0 and "unknown row(s) nope" in (r.stdout + r.stderr)


@pytest.fixture(scope="module")
def linearize_grid(tmp_path_factory):
    """One smoke run of the linearize grid's rows that start from other rows:
    the softmax row, a linearized row, a calibrated row scored as converted, and
    a two-stage row (attention alone, then everything). The work folder."""
    raw = require_data("multi30k")
    tmp_path = tmp_path_factory.mktemp("linearize")
    rows = "softmax,memsizer-linearized-10,t2r-calibrated-0,memsizer-attention-10,memsizer-attention-then-all-25"
    reproduce("mt", raw, tmp_path, "--ablations", "linearize", "--rows", rows)
    with open(tmp_path / "work" / "results" / "linearize-mt-smoke.runs.csv") as f:
        runs = {r["row"]: r for r in csv.DictReader(f)}
    return tmp_path / "work", runs


def test_linearize_grid_starts_a_row_from_the_softmax_rows_checkpoint(linearize_grid):
    """--ablations linearize: a row with linearize_from converts the earlier softmax
    row's best checkpoint (python -m linear_fairseq.linearize, with the row's model
    config and overrides) and fine-tunes from it (checkpoint.finetune_from_model)."""
    work, runs = linearize_grid
    run = work / "runs" / "linearize" / "memsizer-linearized-10-s1"
    assert "| mapped: W_r = out_proj(v_proj(x)); Phi, W_l initialized |" in (run / "linearize.log").read_text()
    assert f"loading pretrained model from {run / 'linearized.pt'}" in (run / "train.log").read_text()
    assert runs["memsizer-linearized-10"]["overrides"].endswith("linearize_from=softmax")
    assert 0 <= float(runs["memsizer-linearized-10"]["bleu"]) <= 100
    # calibrate: N converts with linearize --calibrate; train: false scores the converted model as it is
    calibrated = work / "runs" / "linearize" / "t2r-calibrated-0-s1"
    assert "| calibrated | " in (calibrated / "linearize.log").read_text()
    assert not (calibrated / "train.log").exists() and (calibrated / "validate.log").is_file()
    row = runs["t2r-calibrated-0"]
    assert row["updates"] == "0" and float(row["valid loss"]) > 0 and 0 <= float(row["bleu"]) <= 100
    assert row["overrides"].endswith("linearize_from=softmax calibrate=8 train=False")


def test_a_second_stage_row_continues_from_the_first_stages_checkpoint(linearize_grid):
    """T2R's recipe in the linearize grid: the attention alone first
    (model.train_attention_only), then a `finetune_from` row trains everything
    from that row's last checkpoint."""
    work, runs = linearize_grid
    first, second = (work / "runs" / "linearize" / f"{r}-s1" for r in ("memsizer-attention-10",
                                                                      "memsizer-attention-then-all-25"))
    assert "'train_attention_only': True" in (first / "train.log").read_text()
    log = (second / "train.log").read_text()
    assert f"loading pretrained model from {first / 'checkpoint_last.pt'}" in log
    assert "'train_attention_only': False" in log
    assert runs["memsizer-attention-then-all-25"]["overrides"].endswith("finetune_from=memsizer-attention-10")
    assert (work / "results" / "linearize-mt-smoke.png").read_bytes()[:4] == b"\x89PNG"


def test_a_resumed_row_continues_the_earlier_run_to_twice_its_updates(tmp_path):
    """The budget grid: a `resume_from` row carries on the earlier row's run
    (checkpoint.continue_once: optimizer, schedule and update count restored) to
    twice its updates; its minutes count both stages."""
    raw = require_data("multi30k")
    reproduce("mt", raw, tmp_path, "--ablations", "budget", "--rows", "softmax-1x,softmax-2x")
    first, second = (tmp_path / "work" / "runs" / "budget" / f"softmax-{x}-s1" for x in ("1x", "2x"))
    log = (second / "train.log").read_text()
    assert f"Loaded checkpoint {first / 'checkpoint_last.pt'} (epoch" in log and "@ 16 updates)" in log
    assert "loading pretrained model" not in log  # resumed, not fine-tuned: nothing is reset
    with open(tmp_path / "work" / "results" / "budget-mt-smoke.runs.csv") as f:
        runs = {r["row"]: r for r in csv.DictReader(f)}
    assert int(runs["softmax-1x"]["updates"]) == 16 and int(runs["softmax-2x"]["updates"]) == 32
    assert float(runs["softmax-2x"]["train min"]) > float(runs["softmax-1x"]["train min"])
    assert 0 <= float(runs["softmax-2x"]["bleu"]) <= 100
