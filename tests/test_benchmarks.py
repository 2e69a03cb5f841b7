"""The benchmark harness: `python -m benchmarks.run --quick` end to end (the
JSON's schema, the tables and plots; timings are not asserted), and the
target arithmetic on hand-made records."""
import json
import subprocess
import sys

import pytest

from benchmarks import report
from conftest import ROOT

FAMILIES = ["transformer", "memsizer", "performer", "flash"]


def summary(x):
    return {"median": x, "min": x, "max": x, "runs": [x]}


@pytest.mark.slow
def test_quick_run_writes_json_tables_plots_and_readme_block(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n{report.BEGIN}\nold\n{report.END}\n\nafter\n")
    out = tmp_path / "out"
    r = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--quick", "--out", str(out), "--readme", str(readme)],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert res["schema"] == 1 and res["quick"] is True
    for key in ("cpu", "cpu_count", "threads", "torch", "fairseq", "python", "device"):
        assert res["machine"][key], key
    assert {r["family"] for r in res["decode"]} == set(FAMILIES)
    for rec in res["decode"]:
        assert rec["status"] in ("ok", "skipped")
        if rec["status"] == "ok":
            assert rec["tokens_per_s"]["min"] <= rec["tokens_per_s"]["median"] <= rec["tokens_per_s"]["max"]
            assert rec["step_ms_start"] > 0 and rec["step_ms_end"] > 0 and rec["peak_mem_mib"] >= 0
            assert rec["state_bytes_per_seq"] > 0 and rec["params"] > 0
        else:
            assert "budget" in rec["reason"]
    decode_ok = [rec for rec in res["decode"] if rec["status"] == "ok"]
    assert {(rec["L"], rec["batch"]) for rec in decode_ok} >= {(16, 1), (64, 1)}
    # the softmax cache grows with the prefix; the linear families' state does not
    state = {(rec["family"], rec["L"]): rec["state_bytes_per_seq"] for rec in decode_ok if rec["batch"] == 1}
    assert state[("transformer", 64)] > state[("transformer", 16)]
    for f in FAMILIES[1:]:
        assert state[(f, 64)] == state[(f, 16)], f
    assert {rec["family"] for rec in res["mt"]} == set(FAMILIES)
    assert all(rec["sentences_per_s"]["median"] > 0 for rec in res["mt"] if rec["status"] == "ok")
    assert {rec["family"] for rec in res["train"]} == {*FAMILIES, "transformer_sdpa"}
    assert all(rec["tokens_per_s"]["median"] > 0 for rec in res["train"] if rec["status"] == "ok")
    assert {t["name"].split(":")[0] for t in res["targets"]} >= {"decode memsizer", "mt memsizer", "train flash"}
    for name in ("decode.png", "mt.png", "train.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
    text = readme.read_text()
    assert "old" not in text and "after" in text and "Decoding: generated tokens/s" in text
    assert f"]({out.name}/decode.png)" in text  # plots linked relative to the README


def records(tok):
    """decode records from {(family, L): tokens/s} at batch 16, state bytes by family."""
    return [{"family": f, "arch": f, "params": 1, "L": L, "batch": 16, "status": "ok",
             "tokens_per_s": summary(v), "state_bytes_per_seq": 100 if f != "transformer" else L}
            for (f, L), v in tok.items()]


def test_targets_compare_against_the_softmax_baseline():
    tok = {("transformer", 256): 800, ("transformer", 4096): 100}
    tok.update({(f, L): v for f in ("memsizer", "performer", "flash") for L, v in ((256, 600), (4096, 550))})
    tok[("flash", 4096)] = 450  # 4.5x the baseline, 0.75 of its own speed at 256
    ts = {t["name"]: t for t in report.targets({"decode": records(tok)})}
    speedup = ts["decode memsizer: tokens/s vs transformer_lm, L=4096, batch 16"]
    assert speedup["value"] == pytest.approx(5.5) and speedup["met"]
    assert not ts["decode flash: tokens/s vs transformer_lm, L=4096, batch 16"]["met"]
    assert not ts["decode flash: tokens/s at L=4096 / at L=256, batch 16"]["met"]
    assert ts["decode performer: tokens/s at L=4096 / at L=256, batch 16"]["met"]
    constant = ts["decode memsizer: state bytes per sequence constant over L=[256, 4096], batch 16"]
    assert constant["met"]


def test_targets_not_measured_are_none_not_met():
    ts = report.targets({"decode": records({("memsizer", 256): 600}), "mt": [], "train": []})
    assert all(t["met"] is None for t in ts)
    assert "not measured" in report.target_table(ts)
