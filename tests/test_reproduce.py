"""The reproduction scripts end to end at smoke scale, as a user runs them:
scripts/reproduce.py (what bash scripts/reproduce_{mt,sum,lm}.sh run) on a
slice of the real data with a tiny model and a few dozen updates per family.
Each must leave a table with one row per family asked for and real numbers in
it, under its work folder: the committed tables in results/ change only with
--publish."""
import atexit
import csv
import functools
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest

import forked
from conftest import ROOT, require_data
from scripts import scoring

sys.path.insert(0, str(ROOT / "scripts"))  # the pipeline's modules import their siblings as reproduce.py does
from reproduction.runs import current_cpu, one_cpu, prepare  # noqa: E402

pytestmark = pytest.mark.slow


def committed():
    """git's view of the committed tables and figures."""
    return subprocess.run(["git", "status", "--porcelain", "--", "results", "docs"], cwd=ROOT,
                          capture_output=True, text=True, check=True).stdout


@functools.lru_cache(maxsize=None)
def smoke_data(raw: Path) -> Path:
    """The smoke-scale slice of the dataset in `raw`, prepared once a test process
    as reproduce.py prepares it (its data-prep script with the smoke flags)."""
    folder = tempfile.mkdtemp(prefix=f"smoke-{raw.name}-")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return prepare(raw.name, SimpleNamespace(raw=raw, scale="smoke"), Path(folder))


def with_smoke_data(raw: Path, work: Path) -> None:
    """A copy of smoke_data(raw) as `work`'s data folder: data-prep skips every
    step whose outputs exist, so each run after a process's first prepares
    nothing and the suite prepares each slice once a process, not once a test."""
    if not (work / "data").exists():
        shutil.copytree(smoke_data(Path(raw)), work / "data")


def reproduce(task, raw, tmp_path, *extra):
    """reproduce.py at smoke scale, what bash scripts/reproduce_<task>.sh runs
    after its set-up check (the wrappers themselves: the demo and refusal tests)."""
    with_smoke_data(raw, tmp_path / "work")
    before = committed()
    r = run_reproduce(task, "--scale", "smoke", "--raw", str(raw), "--work", str(tmp_path / "work"), "--quiet", *extra)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert committed() == before  # a run without --publish leaves results/ and docs/ as they were
    return r.stdout


def table(tmp_path, task, configs):
    """The smoke table, checked to have one row per model config in `configs`."""
    md = (tmp_path / "work" / "results" / f"{task}-smoke.md").read_text()
    with open(tmp_path / "work" / "results" / f"{task}-smoke.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["config"] for r in rows] == configs
    assert all(f"| {r['family']} | {r['config']} |" in md for r in rows)
    # a smoke run is marked as not the recipe, in the header and in every row
    assert "Settings: NOT the recipe (smoke scale" in md
    assert all(r["recipe"].startswith("smoke scale") for r in rows)
    for r in rows:
        assert int(r["params"]) > 0 and float(r["train min"]) > 0
        assert float(r["tok/s"]) > 0 and float(r["peak MB"]) > 50 and float(r["others"]) >= 0
        assert r["paper"] == "n/a"
    assert "one thread pinned to one CPU, no warm-up" in md  # the conditions of the speed columns
    return rows


def finite(x):
    return math.isfinite(float(x))


def test_reproduce_mt_smoke(tmp_path):
    """Each family's recommended config and, where it has one, its paper config:
    MemSizer's paper placement (MemSizer cross-attention) is a row of its own."""
    raw = require_data("multi30k")
    out = reproduce("mt", raw, tmp_path, "--average", "2", "--save-interval-updates", "8",
                    "--families", "transformer,memsizer", "--configs", "recommended,paper")
    assert out.count("averaging checkpoint_1_8.pt, checkpoint_1_16.pt") == 3
    rows = table(tmp_path, "mt", ["multi30k_transformer", "multi30k_memsizer", "multi30k_memsizer_paper"])
    for r in rows:
        assert 0 <= float(r["bleu"]) <= 100 and 0 < float(r["chrf"]) <= 100
        assert float(r["sent/s"]) > 0
    assert [r["model"] for r in rows] == ["transformer", "memsizer_transformer", "memsizer_transformer"]
    ckpts = tmp_path / "work" / "checkpoints"
    assert "'cross_attn': 'softmax'" in (ckpts / "memsizer" / "train.log").read_text()
    assert "'cross_attn': 'memsizer'" in (ckpts / "memsizer-paper" / "train.log").read_text()
    # the recommended config adds a window to the files it extends; the paper's placement has none
    assert "'local_window': 16" in (ckpts / "memsizer" / "train.log").read_text()
    assert "'local_window': 0" in (ckpts / "memsizer-paper" / "train.log").read_text()
    for log in ckpts.glob("*/train.log"):  # hydra's and fairseq's known warnings are left out from the start
        assert "Warning" not in log.read_text(), log
    # trained models are reused, and the rows of configs not asked for again are kept
    average = ("--average", "2", "--save-interval-updates", "8")  # the settings it was trained with
    again = reproduce("mt", raw, tmp_path, "--families", "memsizer", "--configs", "paper", *average)
    assert "multi30k_memsizer_paper: already trained" in again and "multi30k_memsizer:" not in again
    after = table(tmp_path, "mt", [r["config"] for r in rows])
    assert after[:2] == rows[:2] and after[2]["bleu"] == rows[2]["bleu"] and after[2]["run"] == rows[2]["run"]
    # a model trained with other settings (here another learning rate) is not reused
    changed = reproduce("mt", raw, tmp_path, "--families", "memsizer", "--configs", "paper", *average,
                        "--set", "optimization.lr=[0.001]")
    assert "holds a run with other settings" in changed and "multi30k_memsizer_paper: training" in changed

    # --by-position: the same models scored target position by target position on the valid set
    out = reproduce("mt", raw, tmp_path, "--families", "transformer,memsizer", "--configs", "recommended",
                    "--by-position", *average)
    assert "training" not in out and "(target positions)" in out
    with open(tmp_path / "work" / "results" / "positions-mt-smoke.csv") as f:
        spans = list(csv.DictReader(f))
    assert [r["config"] for r in spans] == ["multi30k_transformer", "multi30k_memsizer"]
    assert spans[1]["ppl 2 vs softmax"].endswith("%") and "ppl 17-" in " ".join(spans[0])
    assert (tmp_path / "work" / "results" / "positions-mt-smoke.png").stat().st_size > 0
    # over all positions, the per-position scorer agrees with fairseq-validate's loss without smoothing
    ckpt = ckpts / "memsizer" / "checkpoint_best.pt"
    r = forked.run(["fairseq-validate", str(tmp_path / "work" / "data" / "bin"), "--task", "translation",
                    "--path", str(ckpt), "--user-dir", str(ROOT / "linear_fairseq"), "--valid-subset", "valid",
                    "--max-tokens", "4096", "--num-workers", "0", "--required-batch-size-multiple", "1"])
    assert r.returncode == 0, r.stderr[-2000:]
    every = next(k for k in spans[1] if k.startswith("ppl 1-") and "vs" not in k)
    assert float(spans[1][every]) == pytest.approx(2 ** scoring.read_validate_loss(r.stdout + r.stderr, "nll_loss"),
                                                   rel=1e-3)


# two families a task, each family trained in one of them (every family's configs
# are composed and built for every task in test_configs.py)
def test_reproduce_sum_smoke(tmp_path):
    rows = table_after("sum", require_data("news"), tmp_path, ["flash", "performer"])  # rows in registry order
    for r in rows:
        assert all(finite(r[k]) and 0 <= float(r[k]) <= 100 for k in ("r1", "r2", "rl"))
    # what the article's opening scores without training, for scale
    md = (tmp_path / "work" / "results" / "sum-smoke.md").read_text()
    assert re.search(r"Without training, on the same test set: lead-1 ROUGE-1/2/L [\d.]+ / [\d.]+ / [\d.]+; "
                     r"first 30 words ROUGE-1/2/L", md)


def test_lead_baselines_extract_the_opening():
    docs = ["The cat sat. It was warm outside today.", "No full stop here at all"]
    refs = ["The cat sat.", "no full stop"]
    scores = scoring.lead_baselines(docs, refs, words=3)
    assert scores["lead-1"]["r1"] == pytest.approx(100 * (1 + 2 * 0.5 / 1.5) / 2)  # doc 2: P = 3/6, R = 1
    assert scores["first 3 words"]["rl"] == pytest.approx(100 * (1 + 1) / 2)


def test_reproduce_lm_smoke(tmp_path):
    rows = table_after("lm", require_data("austen"), tmp_path, ["transformer", "memsizer"])
    vocab = len((tmp_path / "work" / "data" / "bin" / "dict.txt").read_text().splitlines())
    for r in rows:
        assert 1 < float(r["ppl"]) < 2 * vocab, r  # finite, and not far from uniform after 30 updates
    # the softmax baseline, at least, learns in 30 updates: better than uniform
    assert float(rows[0]["ppl"]) < vocab

    # --by-position: the same models (reused, not retrained) scored position by position on the valid set
    out = reproduce("lm", require_data("austen"), tmp_path, "--families", "transformer,memsizer",
                    "--configs", "recommended", "--by-position")
    assert "training" not in out
    with open(tmp_path / "work" / "results" / "positions-lm-smoke.csv") as f:
        spans = list(csv.DictReader(f))
    assert [r["config"] for r in spans] == ["austen_transformer", "austen_memsizer"]
    assert spans[1]["ppl 33-128 vs softmax"].endswith("%")
    assert (tmp_path / "work" / "results" / "positions-lm-smoke.png").stat().st_size > 0
    # over all positions, the per-position scorer agrees with fairseq's own on the same blocks
    ckpt = tmp_path / "work" / "checkpoints" / "transformer" / "checkpoint_best.pt"
    r = forked.run(["fairseq-eval-lm", str(tmp_path / "work" / "data" / "bin"), "--path", str(ckpt),
                    "--user-dir", str(ROOT / "linear_fairseq"), "--gen-subset", "valid", "--num-workers", "0",
                    "--tokens-per-sample", "128", "--context-window", "0"])
    assert r.returncode == 0, r.stderr[-2000:]
    assert float(spans[0]["ppl 1-128"]) == pytest.approx(scoring.read_perplexity(r.stdout + r.stderr), rel=1e-3)

    # the README's LM examples, on this run's MemSizer LM
    command, python = readme_examples("work/reproduce/lm-cpu", tmp_path / "work")
    assert re.search(r"^H-0\t", command, re.M) and "tensor(" in python


def readme_examples(folder: str, here) -> list:
    """Run the README's code blocks that use `folder` (where a script leaves its
    models) as written, from the repository root, with `folder` standing for
    `here`; their outputs."""
    outputs = []
    for lang, code in re.findall(r"```(bash|python)\n(.*?)```", (ROOT / "README.md").read_text(), re.S):
        if folder not in code:
            continue
        code = code.replace(folder, str(here))
        r = subprocess.run(["bash", "-c", code] if lang == "bash" else [sys.executable, "-c", code],
                           capture_output=True, text=True, cwd=ROOT)
        assert r.returncode == 0 and "Traceback" not in r.stderr, (code, r.stderr[-3000:])
        outputs.append(r.stdout)
    assert len(outputs) == 2, f"the README has {len(outputs)} examples on {folder}, not a command and a Python one"
    return outputs


def table_after(task, raw, tmp_path, families):
    """The recommended configs of `families`."""
    reproduce(task, raw, tmp_path, "--families", ",".join(families), "--configs", "recommended")
    ds = {"sum": "news", "lm": "austen"}[task]
    return table(tmp_path, task, [f"{ds}_{f}" for f in families])


def run_reproduce(task, *args):
    return forked.run([sys.executable, str(ROOT / "scripts" / "reproduce.py"), task, *args])


def one_line(r, text):
    """A refusal: exit 1, one line on stderr that says `text`, nothing run."""
    lines = [line for line in r.stderr.splitlines() if line.startswith("[reproduce]")]
    assert r.returncode == 1 and len(lines) == 1 and text in lines[0], r.stderr[-2000:]
    assert "Traceback" not in r.stderr and "preparing" not in r.stdout


def test_committed_tables_change_only_with_publish_and_only_by_the_recipe(tmp_path):
    """The committed lm-cpu table holds the recipe's MemSizer rows: a 50-update
    run may not replace it, nor write results/ without --publish; smoke runs
    are never published."""
    before = committed()
    one_line(run_reproduce("lm", "--max-update", "50", "--families", "memsizer", "--publish"),
             "results/lm-cpu.csv holds the recipe's rows for austen_memsizer, austen_memsizer_nolocal; a run with "
             "--max-update 50 cannot replace it")
    one_line(run_reproduce("mt", "--set", "optimization.lr=[0.01]", "--configs", "recommended", "--publish"),
             "a run with --set optimization.lr=[0.01] cannot replace it")
    one_line(run_reproduce("lm", "--results", str(ROOT / "results" / "x")),
             "the committed tables change only with --publish")
    one_line(run_reproduce("mt", "--scale", "smoke", "--publish"), "--publish: a smoke scale run is not a result")
    # a table a custom run wrote may take the same custom run again, but not the recipe's rows in another folder
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "lm-cpu.csv").write_text("family,config,recipe\nmemsizer,austen_memsizer,yes\n")
    one_line(run_reproduce("lm", "--set", "common.seed=2", "--families", "memsizer", "--results", str(tmp_path / "mine")),
             "lm-cpu.csv holds the recipe's rows for austen_memsizer")
    assert committed() == before


def test_unknown_family_is_named(tmp_path):
    r = subprocess.run(["bash", str(ROOT / "scripts" / "reproduce_mt.sh"), "--families", "memsizer,linformer"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "unknown family 'linformer'" in r.stderr and "Traceback" not in r.stderr


def test_by_position_is_refused_with_ablations():
    for task in ("mt", "lm"):
        r = subprocess.run(["bash", str(ROOT / "scripts" / f"reproduce_{task}.sh"), "--by-position", "--ablations"],
                           capture_output=True, text=True)
        assert r.returncode == 2 and "--by-position scores the results table's models" in r.stderr, r.stderr[-500:]
        assert "Traceback" not in r.stderr


def test_positions_refuses_a_bad_block_and_a_missing_checkpoint(tmp_path):
    script = str(ROOT / "scripts" / "positions.py")
    r = forked.run([sys.executable, script, str(tmp_path / "none.pt"), str(tmp_path), "--block", "0",
                    "--out", str(tmp_path / "x.json")])
    assert r.returncode == 2 and "--block 0: must be a positive number of tokens" in r.stderr
    r = forked.run([sys.executable, script, str(tmp_path / "none.pt"), str(tmp_path), "--out", str(tmp_path / "x.json")])
    assert r.returncode == 2 and "none.pt: no such checkpoint" in r.stderr


def test_demo_is_the_pipeline_with_its_own_config(tmp_path):
    """bash scripts/demo_mt.sh runs reproduce.py mt --demo: transformer and memsizer
    with configs/mt/multi30k_demo.yaml, the table under its work folder."""
    raw = require_data("multi30k")
    with_smoke_data(raw, tmp_path / "demo")
    r = subprocess.run(["bash", str(ROOT / "scripts" / "demo_mt.sh"), "--data", str(raw), "--scale", "smoke",
                        "--work", str(tmp_path / "demo"), "--quiet"], capture_output=True, text=True)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    md = (tmp_path / "demo" / "results" / "mt-smoke.md").read_text()
    assert "(configs/mt/multi30k_demo.yaml)" in md and "| transformer |" in md and "| memsizer |" in md
    hydra = (tmp_path / "demo" / "checkpoints" / "memsizer" / "hydra" / ".hydra" / "hydra.yaml").read_text()
    assert "config_name: multi30k_demo" in hydra
    # the README's examples after the demo, on the models it left
    command, python = readme_examples("work/demo_mt", tmp_path / "demo")
    assert re.search(r"^H-0\t", command, re.M) and python.strip()


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="this OS cannot pin a process to a CPU")
def test_a_timed_command_is_pinned_to_one_cpu_it_may_use():
    """runs.one_cpu (a timed command's preexec_fn): exactly one CPU, one of the allowed."""
    r = subprocess.run([sys.executable, "-c", "import os; print(sorted(os.sched_getaffinity(0)))"],
                       preexec_fn=one_cpu, capture_output=True, text=True)
    (cpu,) = json.loads(r.stdout)
    assert cpu in os.sched_getaffinity(0) and current_cpu() in os.sched_getaffinity(0)
