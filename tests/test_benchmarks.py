"""The benchmark harness: `python -m benchmarks.run --quick` end to end (the
JSON's schema, the tables and plots; timings are not asserted), and the
target arithmetic on hand-made records."""
import json
import os
import re
import subprocess
import sys

import pytest
import torch

from benchmarks import report, suites
import forked
from conftest import ROOT
from linear_fairseq import families
from linear_fairseq.modules.attention import option_names

FAMILIES = list(families.names())
FILLS_TO_G = {"flash"}  # a CPU state that fills its chunk buffers up to G slots, then adds its sum


def summary(x):
    return {"median": x, "min": x, "max": x, "runs": [x]}


# a budget no quick size can reach, so what runs does not depend on the machine's speed
QUICK = ["--quick", "--budget", "1e9"]


def bench(*argv):
    return forked.run([sys.executable, "-m", "benchmarks.run", *argv], cwd=ROOT)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """One `--quick --suite all` run: (its output folder, the README it rewrote, its stdout)."""
    tmp = tmp_path_factory.mktemp("bench")
    readme = tmp / "README.md"
    readme.write_text(f"# x\n\n{report.BEGIN}\nold\n{report.END}\n\nafter\n")
    out = tmp / "out"
    r = bench(*QUICK, "--out", str(out), "--readme", str(readme))
    assert r.returncode == 0, r.stderr[-3000:]
    return out, readme, r.stdout


@pytest.mark.slow
def test_quick_run_writes_json_tables_plots_and_readme_block(quick_run):
    out, readme, stdout = quick_run
    # a progress label on every measurement line, counting up to the total announced
    labels = re.findall(r"^\[(\d+)/(\d+), \d+ min(?:, about \d+ min left)?\] (?:decode|hybrid|mt|sum|beam|train) ", stdout, re.M)
    assert [int(k) for k, _ in labels] == list(range(1, len(labels) + 1)) and int(labels[-1][1]) == len(labels)
    res = json.loads((out / "results.json").read_text())
    assert res["schema"] == 1 and res["quick"] is True and res["freed_memory"] == "default"
    assert {rec["freed_memory"] for rec in res["train"] + res["local"] if "ctx" in rec} == {"default"}
    assert res["dtype"] == "float32" and {rec["dtype"] for rec in res["train"] + res["local"] if "ctx" in rec} == {
        "float32"}
    assert "Training steps timed with the allocator as it is (`--freed-memory default`). Training in float32." in (
        out / "results.md").read_text()
    for key in ("cpu", "cpu_count", "threads", "torch", "fairseq", "python", "device"):
        assert res["machine"][key], key
    assert {r["family"] for r in res["decode"]} == set(FAMILIES)
    for rec in res["decode"] + res["hybrid"] + res["mt"] + res["sum"] + res["beam"] + res["train"]:
        assert rec["status"] == "ok", rec  # nothing is skipped under this budget
    for rec in res["decode"]:
        assert rec["tokens_per_s"]["min"] <= rec["tokens_per_s"]["median"] <= rec["tokens_per_s"]["max"]
        assert rec["step_ms_start"] > 0 and rec["step_ms_end"] > 0 and rec["peak_mem_mib"] >= 0
        assert rec["state_bytes_per_seq"] > 0 and rec["params"] > 0
    decode_ok = res["decode"]
    assert {(rec["L"], rec["batch"]) for rec in decode_ok} >= {(16, 1), (64, 1)}
    # the softmax cache grows with the prefix; the linear families' state does not, but for
    # FLASH's, which on the CPU fills its chunk buffers to G = 256 slots, then adds its sum and stays
    # (ops.flash.with_room, with_sum)
    state = {(rec["family"], rec["L"]): rec["state_bytes_per_seq"] for rec in decode_ok if rec["batch"] == 1}
    assert state[("transformer", 64)] > state[("transformer", 16)]
    for f in FAMILIES[1:]:
        assert state[(f, 64)] == state[(f, 16)] or (f in FILLS_TO_G and state[(f, 64)] > state[(f, 16)]), f
    assert {rec["family"] for rec in res["mt"]} == set(FAMILIES)
    assert all(rec["sentences_per_s"]["median"] > 0 for rec in res["mt"] if rec["status"] == "ok")
    # a hybrid stack: the linear layers' state stays, the softmax layer's cache grows with the prefix
    hybrid = {(rec["family"], rec["L"]): rec for rec in res["hybrid"]}
    assert {f for f, _ in hybrid} == set(FAMILIES[1:])
    for f in FAMILIES[1:]:
        linear = [hybrid[(f, L)]["linear_state_bytes"] for L in (16, 64)]
        assert (linear[1] == linear[0] or (f in FILLS_TO_G and linear[1] > linear[0])) and linear[0] > 0, f
        assert hybrid[(f, 64)]["softmax_cache_bytes"] > hybrid[(f, 16)]["softmax_cache_bytes"] > 0, f
    rows = {*FAMILIES, *(f"{f}-rec" for f in FAMILIES[1:])}  # each family as its paper and as recommended
    assert {rec["family"] for rec in res["sum"]} == rows and {rec["family"] for rec in res["beam"]} == rows
    # as their papers place them, the linear families summarize the source in a state of fixed size
    state = {(rec["family"], rec["src_len"]): rec["state_bytes_per_hyp"] for rec in res["sum"]}
    assert state[("transformer", 32)] > state[("transformer", 16)]
    for f in FAMILIES[1:]:
        assert state[(f, 32)] == state[(f, 16)], f
    assert {rec["beam"] for rec in res["beam"]} == {1, 4}
    assert {rec["family"] for rec in res["train"]} == {*FAMILIES, "transformer_sdpa"}
    assert all(rec["tokens_per_s"]["median"] > 0 for rec in res["train"] if rec["status"] == "ok")
    # local precision: each family that offers it, without and with the window; the window's state is bounded
    offered = [f for f in FAMILIES[1:] if "local_window" in option_names(families.get(f))]
    assert {rec["family"] for rec in res["local"]} == {*offered, *(f + "+local" for f in offered)}
    local = {(rec["family"], rec["L"]): rec["state_bytes_per_seq"] for rec in res["local"] if rec.get("batch") == 1
             and "L" in rec}
    for f in offered:
        assert local[(f + "+local", 64)] == local[(f + "+local", 16)] > local[(f, 16)], f
    assert any("ctx" in rec and rec["family"] == f + "+local" for rec in res["local"] for f in offered)
    assert {t["name"].split(":")[0] for t in res["targets"]} >= {"local memsizer",
        "decode memsizer", "mt memsizer", "sum memsizer", "beam flash", "train flash"}
    for name in ("decode.png", "hybrid.png", "mt.png", "sum.png", "beam.png", "train.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
    text = readme.read_text()
    assert "old" not in text and "after" in text and "Decoding: generated tokens/s" in text
    assert f"]({out.name}/decode.png)" in text  # plots linked relative to the README


@pytest.mark.slow
def test_resume_keeps_the_suites_measured_and_runs_the_rest(quick_run, tmp_path):
    """An interrupted run (its JSON lacks the last suite) finished by --resume:
    the kept suites' records are the earlier run's, only the missing suite is
    measured, and the header names both runs; other options or code are refused."""
    out = tmp_path / "out"
    out.mkdir()
    first = json.loads((quick_run[0] / "results.json").read_text())
    interrupted = {k: v for k, v in first.items() if k != "train"}
    (out / "results.json").write_text(json.dumps(interrupted))
    r = bench(*QUICK, "--out", str(out), "--no-plots", "--resume")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "kept decode, hybrid, mt, sum, beam, local; measuring train" in r.stdout
    assert re.findall(r"^\[\d+/\d+[^]]*\] (\w+) ", r.stdout, re.M) == ["train"] * len(first["train"])
    res = json.loads((out / "results.json").read_text())
    assert all(res[n] == first[n] for n in ("decode", "hybrid", "mt", "sum", "beam", "local"))
    assert res["ran"] == ["train"] and {rec["family"] for rec in res["train"]} == {*FAMILIES, "transformer_sdpa"}
    assert res["earlier"] == [{"created": first["created"], "command": first["command"],
                               "suites": ["decode", "hybrid", "mt", "sum", "beam", "local"]}]
    assert f"; decode, hybrid, mt, sum, beam, local measured {first['created']} with `{first['command']}`" in (
        out / "results.md").read_text()
    r = bench("--quick", "--budget", "5", "--out", str(out), "--resume")
    assert r.returncode != 0 and r.stderr.strip().splitlines()[-1].startswith(
        f"--resume: {out / 'results.json'} has budget_s 1000000000.0, this run 5.0")
    r = bench(*QUICK, "--out", str(out), "--resume", "--freed-memory", "kept")
    assert r.returncode != 0 and r.stderr.strip().splitlines()[-1].startswith(
        f"--resume: {out / 'results.json'} has freed_memory 'default', this run 'kept'")
    r = bench(*QUICK, "--out", str(out), "--resume", "--dtype", "bfloat16")
    assert r.returncode != 0 and r.stderr.strip().splitlines()[-1].startswith(
        f"--resume: {out / 'results.json'} has dtype 'float32', this run 'bfloat16'")
    (out / "results.json").write_text(json.dumps({**interrupted, "code": "0" * 16}))  # the code changed since
    r = bench(*QUICK, "--out", str(out), "--resume")
    assert r.returncode != 0 and "was measured with other code (digest 0000000000000000" in r.stderr
    (out / "results.json").write_text("{")
    r = bench(*QUICK, "--out", str(out), "--resume")
    assert r.returncode != 0 and r.stderr.strip().splitlines()[-1].startswith(f"--resume: {out / 'results.json'} is not JSON")


def test_an_earlier_run_is_refused_unless_resumed_or_replaced(tmp_path):
    """An OUT holding an earlier run's results.json is not measured over: one
    line naming the file and the flags, the file untouched; --replace lets the
    run rewrite it; --resume with --replace is refused."""
    from benchmarks import run

    out = tmp_path / "out"
    out.mkdir()
    (out / "results.json").write_text('{"earlier": 1}')
    r = bench("--quick", "--suite", "train", "--out", str(out))
    assert r.returncode == 1 and r.stderr.strip() == (
        f"benchmarks.run: {out / 'results.json'} holds an earlier run; --resume to finish it, --replace to "
        f"measure anew (rewriting it), or another --out")
    assert (out / "results.json").read_text() == '{"earlier": 1}'
    assert run.parse_args(["--quick", "--out", str(out), "--replace"]).replace
    r = bench("--quick", "--out", str(out), "--replace", "--resume")
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].endswith("--resume keeps an earlier run's "
                                                                             "suites, --replace measures them "
                                                                             "anew: choose one")


def records(tok):
    """decode records from {(family, L): tokens/s} at batch 16, state bytes by family."""
    return [{"family": f, "arch": f, "params": 1, "L": L, "batch": 16, "status": "ok",
             "tokens_per_s": summary(v), "state_bytes_per_seq": 100 if f != "transformer" else L}
            for (f, L), v in tok.items()]


FAULTS = """
import os, resource, sys, torch
from benchmarks.measure import freed_memory


def faulted(n):  # the share of its pages a block of n floats faults in, allocated where one of 2n was just freed
    x = torch.ones(2 * n)
    del x
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    y = torch.ones(n)
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) * os.sysconf("SC_PAGE_SIZE") / (4 * n)


with freed_memory(sys.argv[1]) as mode:
    inside = faulted(2**23)  # 32 MiB where 64 MiB were: above what glibc ever takes from its heap by default
print(mode, inside, faulted(2**25))  # 128 MiB where 256 MiB were: more than the heap grew to above
"""


def test_kept_freed_memory_is_reused_without_page_faults():
    """With freed memory kept, a block freed by one step is reused by the next
    (here 32 MiB where 64 MiB were): it faults in (almost) none of its pages,
    where by default, and again after the kept block, a block is mapped anew
    and faulted in page by page (after the block with blocks larger than any
    free space the kept heap holds, which would otherwise be reused first)."""
    def run(mode):  # in a fresh interpreter
        r = subprocess.run([sys.executable, "-c", FAULTS, mode], cwd=ROOT, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-2000:]
        mode, inside, after = r.stdout.split()
        return mode, float(inside), float(after)

    mode, inside, after = run("kept")
    assert mode == "kept" and inside < 0.01 and after > 0.5
    mode, inside, after = run("default")
    assert mode == "default" and inside > 0.5 and after > 0.5


def test_the_train_suite_trains_in_the_dtype_asked():
    """--dtype reaches the models the training suites time: their records name the
    weights' dtype, and a half-precision step's loss is finite."""
    from benchmarks import suites

    recs = suites.train([8], 16, "cpu", 1e9, 1, rows=("transformer_sdpa", "flash"), log=lambda line: None,
                        dtype=torch.bfloat16)
    assert [(r["family"], r["status"], r["dtype"]) for r in recs] == [
        ("transformer_sdpa", "ok", "bfloat16"), ("flash", "ok", "bfloat16")]


def test_training_profile_lists_each_rows_launches_and_costliest_operators(tmp_path):
    """benchmarks.profile_train on the CPU: a record per row and dtype with the step's
    operators (launches on a GPU) and its costliest ones, by falling share; FLASH's 8
    GAUs run more operators than softmax's 4 layers. Bad rows and dtypes: one line."""
    out = tmp_path / "profile.json"
    r = forked.run([sys.executable, "-m", "benchmarks.profile_train", "--families", "transformer,flash", "--ctx", "16",
                    "--tokens", "32", "--top", "4", "--out", str(out)], cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    recs = json.loads(out.read_text())
    assert [(x["family"], x["dtype"], x["batch"], x["launches_are"]) for x in recs] == [
        ("transformer", "float32", 2, "aten operators"), ("flash", "float32", 2, "aten operators")]
    for x in recs:
        shares = [o["share"] for o in x["top"]]
        assert len(shares) == 4 and shares == sorted(shares, reverse=True) and 0 < sum(shares) <= 1 + 1e-9
        assert x["step_ms"] > 0 and all(o["op"].startswith("aten::") and o["calls"] >= 1 for o in x["top"])
    assert recs[1]["launches"] > recs[0]["launches"]
    assert "| flash (7.88M, ctx 16, batch 2) | float32 |" in r.stdout
    for argv, message in ((["--families", "nope"], "--families: unknown row 'nope' (choose from transformer, "),
                          (["--dtype", "float64"], "--dtype: unknown 'float64' (choose from float32, bfloat16, float16")):
        r = forked.run([sys.executable, "-m", "benchmarks.profile_train", *argv], cwd=ROOT)
        assert r.returncode == 2 and message in r.stderr.strip().splitlines()[-1]


def test_lengths_replace_what_the_generating_suites_generate_to(capsys):
    """--lengths 256,1024 sets the decode, hybrid and local suites' lengths (and
    no other suite's sizes); a bad value is one line naming it."""
    from benchmarks import run

    sizes = run.with_lengths(run.FULL, run.parse_args(["--lengths", "256,1024", "--out", "/nonexistent"]).lengths)
    assert {n for n in sizes if sizes[n] != run.FULL[n]} == {"decode", "hybrid", "local"}
    assert all(sizes[n] == {**run.FULL[n], "lengths": [256, 1024]} for n in ("decode", "hybrid", "local"))
    for bad in ("0", "256,x", ""):
        with pytest.raises(SystemExit):
            run.parse_args(["--lengths", bad])
        assert capsys.readouterr().err.splitlines()[-1] == (
            f"python -m benchmarks.run: error: argument --lengths: {bad!r}: give positive whole numbers separated "
            f"by commas, e.g. 256,1024")


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


def test_recommended_placement_takes_the_roles_of_the_files_a_config_extends():
    """The benchmarks' recommended placement is the roles of the recommended
    Multi30k config, read through the files it extends: kernel attention and
    MemSizer keep softmax in the roles their recommended configs leave to it."""
    from benchmarks.models import placement_args

    assert placement_args("performer", "recommended") == ["--encoder-self-attn=softmax", "--cross-attn=softmax"]
    assert placement_args("memsizer", "recommended") == ["--cross-attn=softmax"]
    assert placement_args("memsizer", "paper") == placement_args("transformer", "recommended") == []


def test_targets_not_measured_are_none_not_met():
    ts = report.targets({"decode": records({("memsizer", 256): 600}), "mt": [], "train": []})
    assert all(t["met"] is None for t in ts)
    assert "not measured" in report.target_table(ts)


def test_size_projection_fits_linear_plus_quadratic():
    from benchmarks.measure import projected_seconds

    assert projected_seconds([], 100) == 0.0
    assert projected_seconds([(10, 1.0)], 20) == pytest.approx(4.0)  # one point: the quadratic worst case
    linear = [(10, 1.0), (20, 2.0)]
    assert projected_seconds(linear, 80) == pytest.approx(8.0)
    quadratic = [(10, 1.0), (20, 4.0)]
    assert projected_seconds(quadratic, 40) == pytest.approx(16.0)


def test_sizes_past_the_budget_are_recorded_as_skipped():
    """With a budget no run fits, the first size runs (nothing to project from)
    and every larger one is recorded as skipped with its projection."""
    from benchmarks import suites

    records = suites.decode([8, 16, 32], [1], "cpu", budget=1e-9, repeats=1, families=("memsizer",), log=lambda *a: None)
    status = {rec["L"]: rec["status"] for rec in records}
    assert status[8] == "ok" and status[32] == "skipped"
    assert all("budget" in rec["reason"] for rec in records if rec["status"] == "skipped")


def test_beam_and_training_targets_hold_each_family_to_its_own_bar():
    beam = [{"family": f, "beam": k, "status": "ok", "sentences_per_s": summary(v * k), "peak_mem_mib": mem}
            for f, v, mem in (("transformer", 1.0, 100), ("memsizer", 2.5, 50), ("performer", 1.5, 40), ("flash", 3.0, 120))
            for k in (4, 64)]
    train = [{"family": f, "ctx": 8192, "status": "ok", "tokens_per_s": summary(v)}
             for f, v in (("transformer", 100), ("memsizer", 300), ("performer", 160), ("flash", 240))]
    ts = {t["name"]: t for t in report.targets({"beam": beam, "train": train})}
    assert ts["beam memsizer: sentences/s vs transformer, beam 64"]["value"] == pytest.approx(2.5)
    assert ts["beam memsizer: sentences/s vs transformer, beam 64"]["met"]
    assert not ts["beam performer: sentences/s vs transformer, beam 64"]["met"]
    assert ts["beam performer: peak memory below transformer's, beam 64"]["met"]
    assert not ts["beam flash: peak memory below transformer's, beam 64"]["met"]
    assert ts["train memsizer: tokens/s vs transformer_lm, context 8192"]["met"]  # 3.0x, wanted 3x
    assert ts["train performer: tokens/s vs transformer_lm, context 8192"]["met"]  # 1.6x, wanted 1.5x
    assert not ts["train flash: tokens/s vs transformer_lm, context 8192"]["met"]  # 2.4x, wanted 2.5x
    assert ts["train flash: tokens/s vs transformer_lm, context 2048"]["value"] is None


def test_step_profile_splits_each_familys_step_by_module(tmp_path):
    """python -m benchmarks.profile_step: every family's step split into attention,
    FFN, output projection and the rest (timings themselves not asserted)."""
    out = tmp_path / "profile.json"
    r = forked.run([sys.executable, "-m", "benchmarks.profile_step", "--length", "4", "--repeats", "1",
                    "--out", str(out)], cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    records = json.loads(out.read_text())
    assert [rec["family"] for rec in records] == FAMILIES
    for rec in records:
        ms = assert_split(rec)
        assert ms["cross"] == 0, rec  # a decoder-only model
        # a GAU stands in for attention and FFN: no separate FFN to time
        assert (ms["ffn"] == 0) == (rec["family"] == "flash"), rec
    assert f"| {records[0]['arch']}, " in r.stdout


def assert_split(rec):
    """The timed parts run inside the generation, each counted once: together
    less than the whole, and `rest` is what they leave."""
    ms = rec["ms_per_step"]
    timed = sum(v for k, v in ms.items() if k not in ("rest", "total"))
    assert ms["attention"] > 0 and ms["output"] > 0 and 0 < timed < ms["total"], rec
    assert ms["rest"] == pytest.approx(ms["total"] - timed)
    return ms


def test_beam_profile_splits_encoder_decoder_steps(tmp_path):
    """--task mt: beam search over random sources; the cross-attention, the
    encoder pass and the reorders of beam search are timed apart."""
    out = tmp_path / "profile.json"
    rows = ["transformer", "memsizer", "flash-rec"]
    r = forked.run([sys.executable, "-m", "benchmarks.profile_step", "--task", "mt", "--families", ",".join(rows),
                    "--length", "3", "--src-len", "8", "--beam", "3", "--repeats", "1", "--out", str(out)], cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    records = json.loads(out.read_text())
    assert [rec["family"] for rec in records] == rows
    for rec in records:
        ms = assert_split(rec)
        assert ms["cross"] > 0 and ms["encoder"] > 0 and ms["reorder"] > 0, rec
        assert (rec["beam"], rec["src_len"], rec["batch"]) == (3, 8, 2)
    assert "flash-rec, S=8, beam 3" in r.stdout


@pytest.mark.parametrize("argv, message", [
    (["--length", "0"], "--length 0: must be a positive integer"),
    (["--task", "mt", "--beam", "0"], "--beam 0: must be a positive integer"),
    (["--task", "mt", "--families", "memsizer-x"], "unknown row 'memsizer-x'"),
    (["--runs", "0"], "--runs 0: must be a positive integer"),
    (["--rounds", "0"], "--rounds 0: must be a positive integer"),
    (["--families", "memsizer-x"], "unknown family 'memsizer-x'"),
])
def test_step_profile_and_turns_refuse_bad_values(argv, message):
    tool = {"--runs": "benchmarks.turns", "--rounds": "benchmarks.host_step",
            "--families": "benchmarks.host_step"}.get(argv[0], "benchmarks.profile_step")
    r = forked.run([sys.executable, "-m", tool, *argv], cwd=ROOT)
    assert r.returncode == 2 and message in r.stderr


def test_turns_times_rows_in_turns_against_the_first(tmp_path):
    """python -m benchmarks.turns: every row's speed a round, --runs rounds, and each
    median's ratio to the first row's (the timings themselves not asserted)."""
    r = forked.run([sys.executable, "-m", "benchmarks.turns", "--families", "transformer,memsizer", "--length", "4",
                    "--runs", "2"], cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["unit"] == "tokens/s" and [len(xs) for xs in got["runs"].values()] == [2, 2]
    assert got["ratio"]["transformer"] == 1.0
    assert got["ratio"]["memsizer"] == round(got["median"]["memsizer"] / got["median"]["transformer"], 3)


def test_host_step_times_each_family_on_its_gpu_path_against_the_first(tmp_path):
    """python -m benchmarks.host_step: every family's greedy step at tiny widths, its
    modules on their CUDA path (one recorded Triton launch a layer where Triton imports,
    bound as Triton's launcher binds it for sm_90: every step's launches of a family
    take one compiled kernel), each median's ratio to the first row's, the aten operators
    a step dispatches (no family's more than softmax's), JSON and a table; an earlier run
    is kept unless --replace (the timings themselves not asserted)."""
    from benchmarks import models
    from benchmarks.host_step import unbound

    out = tmp_path / "host.json"
    argv = [sys.executable, "-m", "benchmarks.host_step", "--length", "3", "--rounds", "2", "--out", str(out)]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # launches recorded, not interpreted
    r = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert list(rows) == list(models.FAMILIES) and all(len(row["rounds"]) == 2 for row in rows.values())
    assert rows["transformer"]["vs_first"] == 1.0 and rows["transformer"]["triton_launches_per_step"] == 0
    for family in models.FAMILIES[1:]:
        layers = len(models.build("lm", family)[0].decoder.layers) if unbound() is None else 0
        assert rows[family]["triton_launches_per_step"] == layers, family
        assert rows[family]["triton_kernels_compiled"] == (1 if layers else 0), family
        assert rows[family]["vs_first"] == round(rows[family]["ms_per_step"] / rows["transformer"]["ms_per_step"], 3)
        assert 0 < rows[family]["aten_ops_per_step"] <= rows["transformer"]["aten_ops_per_step"], family
    assert "| flash |" in out.with_suffix(".md").read_text()
    again = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    said = [line for line in again.stderr.splitlines() if not line.startswith("INFO:fairseq")]  # fairseq's import
    assert again.returncode == 1 and len(said) == 1 and "--replace" in said[0]
    interpreted = forked.run(argv[:-1] + [str(tmp_path / "other.json")], cwd=ROOT,
                             env={**os.environ, "TRITON_INTERPRET": "1"})
    assert interpreted.returncode == 1 and "TRITON_INTERPRET=1" in interpreted.stderr
    assert interpreted.stderr.count("\n") == 1 and not (tmp_path / "other.json").exists()


def test_host_step_ratio_is_that_of_the_recorded_medians():
    """The record's ratio is computed from the medians as recorded (4 decimals), so a
    reader who divides them gets it: here the unrounded medians' ratio rounds to 1.235,
    the recorded ones' (1.2345 / 1.0) to 1.234. The first family is the one compared with."""
    from benchmarks.host_step import step_times

    got = step_times({"transformer": [0.99996, 2.0, 0.5], "flash": [1.23448, 1.3, 1.1]})
    assert got["transformer"] == {"ms_per_step": 1.0, "vs_first": 1.0, "rounds": [1.0, 2.0, 0.5]}
    assert got["flash"]["ms_per_step"] == 1.2345 and got["flash"]["vs_first"] == 1.234
    assert got["flash"]["rounds"] == [1.2345, 1.3, 1.1]


def test_host_step_models_are_tiny_end_to_end_and_their_subnormals_flushed():
    """host_step's arithmetic costs next to nothing and nothing that depends on values:
    the model is 32 wide from its embeddings to its output layer (fairseq's LM would
    otherwise project to 512 wide ones), and on the GPU path a subnormal float is read
    as zero (the outputs of recorded launches, left as allocated, are often subnormal),
    on this thread only while timing."""
    from benchmarks import host_step

    for family in ("transformer", "flash"):
        decoder = host_step.model_at_tiny_widths(family).decoder
        assert decoder.project_in_dim is None and decoder.project_out_dim is None, family
        assert decoder.embed_tokens.weight.shape[1] == decoder.output_projection.weight.shape[1] == 32, family
    model, subnormal = host_step.model_at_tiny_widths("transformer"), torch.tensor([1e-40])
    with host_step.flushed_subnormals() as flushes:
        pass
    if not flushes:
        pytest.skip("this CPU cannot flush subnormal floats (torch.set_flush_denormal)")
    with host_step.on_gpu_path(model):
        assert (subnormal * 1.0).item() == 0.0
    assert (subnormal * 1.0).item() > 0.0


STUB_MODELS = """FAMILIES = ["slow", "fast"]
def build(kind, family, device="cpu", placement="paper"):
    return family, None, {}
"""
STUB_SUITES = """def seq2seq_rows():
    return {"slow": ("slow", "paper"), "fast": ("fast", "paper")}
def random_source(d, sentences, S, generator, device):
    return None
def timed_generation(model, d, L, B, device, beam=1, src_tokens=None):
    return {"slow": 2.0, "fast": 0.5}[model], [], {}, 0.0
"""


@pytest.mark.parametrize("bad_below, status", [("3.9", 0), ("4.1", 1)])
def test_turns_run_as_a_file_times_the_tree_it_runs_in(tmp_path, bad_below, status):
    """Run as a file from another tree, it takes that tree's benchmarks (here a stub
    whose generations take 2 s and 0.5 s: the second row 4x the first); --bad-below
    R exits 1 where a ratio is below R, as git bisect run reads it."""
    (tmp_path / "benchmarks").mkdir()
    (tmp_path / "benchmarks" / "__init__.py").write_text("")
    (tmp_path / "benchmarks" / "models.py").write_text(STUB_MODELS)
    (tmp_path / "benchmarks" / "suites.py").write_text(STUB_SUITES)
    r = forked.run([sys.executable, str(ROOT / "benchmarks" / "turns.py"), "--task", "mt", "--families", "slow,fast",
                    "--runs", "1", "--bad-below", bad_below], cwd=tmp_path)
    assert r.returncode == status, r.stderr[-3000:]
    assert json.loads(r.stdout)["ratio"] == {"slow": 1.0, "fast": 4.0}


def test_gpu_ops_check_keeps_the_other_sections_when_one_fails(tmp_path, monkeypatch, capsys):
    """A section that raises (a kernel that fails to compile, say) is recorded
    with its error; the sections after it still run and the JSON, written after
    each, holds them; the check ends with one line naming the failed section."""
    from benchmarks import gpu_ops_check

    def parity(*args):
        raise RuntimeError("no kernel for this device")

    out = tmp_path / "ops.json"
    monkeypatch.setattr(gpu_ops_check, "parity", parity)
    monkeypatch.setattr(gpu_ops_check, "all_cases", lambda device: ([], []))
    monkeypatch.setattr(sys, "argv", ["gpu_ops_check.py", "--device", "cpu", "--quick", "--out", str(out)])
    with pytest.raises(SystemExit) as stop:
        gpu_ops_check.main()
    assert stop.value.code == f"gpu_ops_check: parity failed (the traceback above; {out} has the rest)"
    saved = json.loads(out.read_text())
    assert saved["parity_error"] == "RuntimeError: no kernel for this device" and saved["low_precision"] == []


def test_gpu_ops_check_leaves_rfa_off_fla_core_where_its_gate_would_train_wrongly(monkeypatch):
    """On a GPU where performer_fla.gate_trouble names a reason, the check's RFA case has no
    fla form (fla-core's gated backward would raise there and stop the section); the other
    feature maps keep it, and without the trouble RFA has it too."""
    from benchmarks.ops_cases import performer as performer_cases
    from linear_fairseq.ops import performer_fla

    if performer_fla.unavailable():
        pytest.skip(performer_fla.unavailable())
    forms = lambda: {case.name: set(case.forms) for case in performer_cases.cases("cuda")}  # noqa: E731
    monkeypatch.setattr(performer_fla, "gate_trouble", lambda device: "Triton 3.6.0 builds it wrongly")
    assert forms() == {**{f"performer-{m}": {"chunked", "parallel", "fla"} for m in ("elu", "favor", "t2r")},
                       "performer-rfa": {"chunked", "parallel"}}
    monkeypatch.setattr(performer_fla, "gate_trouble", lambda device: None)
    assert all("fla" in names for names in forms().values())


def test_gpu_ops_check_runs_every_family_on_this_machine(tmp_path):
    """The device check a GPU session runs, here on the CPU with short sequences:
    it imports, covers every registered family (each through its
    benchmarks/ops_cases module), and their forms agree with the references."""
    from benchmarks import gpu_ops_check
    from linear_fairseq import families

    out = tmp_path / "ops.json"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_ops_check.py"), "--device", "cpu", "--quick",
                        "--out", str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    report_ = json.loads(out.read_text())
    assert report_["families_without_ops_cases"] == []
    covered = {row["family"].split("-")[0] for row in report_["parity"]}
    assert covered == set(families.names(baseline=False))
    forms = {(row["family"], row["form"]) for row in report_["parity"]}
    assert {("flash", "mixed_chunk"), ("flash", "step"), ("memsizer", "chunked")} <= forms
    assert {(f"performer-{m}", "parallel") for m in ("elu", "favor", "rfa", "t2r")} <= forms
    for row in report_["parity"]:
        assert row["out_vs_naive"] < 1e-5 and row.get("grad_vs_naive", 0.0) < 1e-5, row
    assert all(row["finite"] and row["rel_err_vs_fp32"] < 2e-2 for row in report_["low_precision"])
    # the speed section's forward+backward closures (timed on CUDA only) build and run here
    cases, _ = gpu_ops_check.all_cases(torch.device("cpu"))
    timed = gpu_ops_check.family_forms(cases, 1, 64, torch.device("cpu"))
    assert {"memsizer-chunked", "flash-mixed_chunk-bf16", "flash-gau-from_z-bf16", "performer-favor-parallel"} <= set(timed)
    for make in timed.values():
        make()()
    if not torch.cuda.is_available():  # asked for CUDA where there is none: one line
        r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_ops_check.py")], capture_output=True, text=True)
        assert r.returncode == 1 and r.stderr.strip().splitlines()[-1].startswith("gpu_ops_check: no CUDA device")
        assert "Traceback" not in r.stderr


@pytest.mark.parametrize("family,extra", [
    ("performer", ()), ("memsizer", ()), ("memsizer", ("--short-conv", "4", "--local-window", "32")),
    ("flash", ("--gau-chunk-size", "64")),  # more than one chunk at both lengths
])
def test_training_runs_as_many_operators_at_every_length(family, extra):
    """The whole LM's forward+backward (benchmarks.op_counts, the CPU proxy for GPU
    kernel launches) runs the same number of aten operators at T = 128 and 512:
    no loop over chunks or positions anywhere in the family's training path
    (local precision's included)."""
    from benchmarks import models, op_counts

    model, _, _ = models.build("lm", family, extra=extra)
    assert op_counts.train_ops(model, 128) == op_counts.train_ops(model, 512)


def test_kernel_attention_on_fla_core_trains_with_as_many_operators_at_every_length(triton_device):
    """Kernel attention's training on CUDA (fla-core's kernels), counted as
    `benchmarks.op_counts` counts it (Triton's interpreter, each launch one
    operator, counted and not run): the same count at T = 128 and 512, fla-core's
    kernels among them, fewer operators than the torch path's pass."""
    from benchmarks import models, op_counts
    from linear_fairseq.ops import performer_fla

    if triton_device != "cpu":
        pytest.skip("the count runs Triton's interpreter; this machine runs Triton on CUDA")
    if performer_fla.unavailable():
        pytest.skip(performer_fla.unavailable())
    model = models.build("lm", "performer")[0]
    (short, launched), (long, _) = (op_counts.train_ops(model, T, triton=True) for T in (128, 512))
    assert short == long and launched >= 8 and short < op_counts.train_ops(model, 128)[0]


def test_flash_on_its_training_kernels_runs_as_many_operators_at_every_length(triton_device):
    """FLASH's training pass with its causal GAUs on the mixed chunk kernels, counted
    as `benchmarks.op_counts` counts it: the same count over one chunk (T = 128 <
    G = 256) and two (T = 512), five launches a GAU, fewer operators than the torch
    pass's."""
    from benchmarks import models, op_counts

    if triton_device != "cpu":
        pytest.skip("the count runs Triton's interpreter; this machine runs Triton on CUDA")
    model = models.build("lm", "flash")[0]
    (short, launched), (long, _) = (op_counts.train_ops(model, T, triton=True) for T in (128, 512))
    assert short == long and launched == 5 * len(model.decoder.layers)
    assert short < op_counts.train_ops(model, 128)[0]


def test_memsizer_decoding_step_runs_no_more_operators_a_layer_than_softmax():
    """benchmarks.op_counts' decoding step, per decoder layer: MemSizer's layer runs
    no more aten operators than fairseq's softmax layer (the issue's launch
    target, met by this family), and its count does not grow with the prefix."""
    from benchmarks import models, op_counts

    def per_layer(family, prefix):
        return op_counts.decode_ops(models.build("lm", family)[0], prefix)["per_layer"]

    assert per_layer("memsizer", 16) == per_layer("memsizer", 64) <= per_layer("transformer", 16)


def test_gpu_ops_check_compares_the_fused_steps_with_the_torch_steps(monkeypatch, triton_device):
    """The GPU check's fused-steps section: every family whose LM can decode on
    Triton kernels, and every family with the recommended sliding window, is
    listed, the kernels ran (here told to, through the interpreter), and their
    outputs follow the torch steps."""
    from benchmarks import gpu_ops_check
    from linear_fairseq.modules.flash_gau import GatedAttentionUnit
    from linear_fairseq.modules.local import SlidingWindow
    from linear_fairseq.modules.memsizer_attention import MemsizerAttention
    from linear_fairseq.modules.performer_attention import PerformerAttention

    for module in (GatedAttentionUnit, MemsizerAttention, PerformerAttention, SlidingWindow):
        monkeypatch.setattr(module, "runs_on_triton", lambda self, x: True)
    rows = gpu_ops_check.fused_steps(None, torch.device(triton_device), (3,))
    assert sorted(r["family"] for r in rows) == ["flash", "memsizer", "memsizer+local", "performer", "performer+local"]
    for row in rows:
        assert row["ran"] == "yes" and row["out_vs_torch_step"] < 1e-4, row


def test_gpu_ops_check_compares_training_on_the_kernels_with_the_torch_forms(monkeypatch, triton_device):
    """The GPU check's fused-training section: kernel attention's LM trains on the
    kernels (fla-core's and FAVOR+'s feature kernels; here told to, through the
    interpreter) to the torch forms' loss and gradients, alone and with the
    recommended window on its kernels, and FLASH's on its mixed chunk kernels, in
    float32 and (to bfloat16's precision) in bfloat16 (not kernel attention:
    fla-core's kernels multiply no bfloat16 in the interpreter); FLASH's rows name
    the tiles its kernels ran with."""
    from benchmarks import gpu_ops_check
    from linear_fairseq.modules.flash_gau import GatedAttentionUnit
    from linear_fairseq.modules.local import SlidingWindow
    from linear_fairseq.ops.mixed_chunk_triton import TILES
    from linear_fairseq.modules.performer_attention import PerformerAttention
    from linear_fairseq.ops import performer_fla

    if performer_fla.unavailable():
        pytest.skip(performer_fla.unavailable())
    for module in (GatedAttentionUnit, PerformerAttention, SlidingWindow):
        monkeypatch.setattr(module, "runs_on_triton", lambda self, x: True)
    device, small = torch.device(triton_device), ("--decoder-layers", "1")  # fla-core interpreted: a small LM
    rows = {(r["family"], r["dtype"]): r for r in gpu_ops_check.fused_training(None, device, (16,), ["flash"], small)
            + gpu_ops_check.fused_training(None, device, (16,), ["performer"], (*small, "--num-features", "16"),
                                           dtypes=(torch.float32,))}
    assert sorted(rows) == [("flash", "bfloat16"), ("flash", "float32"), ("performer", "float32"),
                            ("performer+local", "float32")]  # with the window, which trains on its kernels
    eps = torch.finfo(torch.bfloat16).eps
    for (family, dtype), row in rows.items():
        loss, grad = (1e-5, 1e-4) if dtype == "float32" else (eps, 4 * eps)
        assert row["ran"] == "yes" and row["loss_vs_torch"] < loss and row["grad_vs_torch"] < grad, row
    # the tiles FLASH's kernels ran with (off CUDA the first, untimed); kernel attention chooses none
    assert rows["flash", "float32"]["tiles"] == str(TILES[0]) and rows["flash", "float32"]["tile_ms"] == {}
    assert "tiles" not in rows["performer", "float32"]


@pytest.mark.parametrize("family,extra", [("performer", ()), ("flash", ()), ("memsizer", ()),
                                          ("memsizer", suites.LOCAL), ("performer", suites.LOCAL)])
def test_decoding_on_the_fused_steps_runs_no_more_operators_than_softmax(triton_device, family, extra):
    """The same count with the family decoding on its Triton kernels (counted on
    CPU through Triton's interpreter, each launch one operator, as
    `benchmarks.op_counts` does), alone and with the recommended sliding window
    beside it (suites.LOCAL, on its kernel too): its layers (a FLASH layer is a
    GAU, half a transformer layer) and its whole step run no more operators than
    softmax's, fewer than its torch step, flat in the prefix; with greedy search's
    reorder after it, too."""
    from benchmarks import models, op_counts

    if triton_device != "cpu":
        pytest.skip("the count runs Triton's interpreter; this machine runs Triton on CUDA")
    softmax = op_counts.decode_ops(models.build("lm", "transformer")[0], 16)
    model = models.build("lm", family, extra=extra)[0]
    assert op_counts.triton_modules(model)
    fused = [op_counts.decode_ops(model, prefix, triton=True) for prefix in (16, 64)]
    torch_step = op_counts.decode_ops(model, 16)
    assert fused[0] == fused[1]
    in_layers = lambda c: c["per_layer"] * c["layers"]  # noqa: E731
    assert in_layers(fused[0]) <= in_layers(softmax) and in_layers(fused[0]) < in_layers(torch_step)
    assert fused[0]["step"] <= softmax["step"] and fused[0]["step"] < torch_step["step"]
    assert fused[0]["step"] + fused[0]["reorder"] <= softmax["step"] + softmax["reorder"]


def test_a_training_pass_adds_into_no_earlier_gradient():
    """The train suite's pass (and op_counts' count of it) starts from gradients set
    to None, as fairseq's trainer leaves them between updates: after an earlier
    pass, autograd hands each parameter its gradient without adding (no operator
    runs inside AccumulateGrad), so the count holds no operator a trainer never runs."""
    from torch.profiler import ProfilerActivity, profile

    from benchmarks import models, op_counts, suites

    model = models.build("lm", "memsizer", extra=["--decoder-layers", "1"])[0].train()
    tokens = torch.randint(4, models.VOCAB, (1, 33))
    suites.train_pass(model, tokens)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        suites.train_pass(model, tokens)
    ops = op_counts.leaf_aten(prof)
    assert ops and not [e for e in ops if op_counts.within(e, "torch::autograd::AccumulateGrad")]
    assert all(p.grad is not None for p in model.parameters())


def test_an_operator_that_copies_its_strided_input_first_counts_with_its_copy():
    """A layer norm or softmax over a strided view (a part of a stacked projection)
    copies it into a contiguous tensor and then runs its own kernel: op_counts
    counts both, where over a contiguous input it counts the one."""
    import torch.nn.functional as F

    from benchmarks import op_counts

    x = torch.randn(4, 16)
    part, whole = x[:, 4:12], x[:, 4:12].contiguous()
    for op in (lambda t: F.layer_norm(t, (8,)), lambda t: t.softmax(-1)):
        assert op_counts.count(lambda: op(whole))[0] == 1
        assert op_counts.count(lambda: op(part))[0] == 2


def test_op_counts_does_not_write_over_earlier_counts(tmp_path):
    out = tmp_path / "counts.json"
    out.write_text("{}")
    r = forked.run([sys.executable, "-m", "benchmarks.op_counts", "--families", "memsizer", "--out", str(out)],
                   cwd=ROOT)
    assert r.returncode == 1 and r.stderr.strip() == (f"benchmarks.op_counts: {out} holds earlier counts; "
                                                      f"--replace to count anew (rewriting it), or another --out")
    assert out.read_text() == "{}"


def test_a_view_counts_no_operator_and_a_copy_one():
    """benchmarks.op_counts counts kernels: views (movedim, unsqueeze, ...) launch
    none; flattening a permuted tensor copies it, one."""
    from benchmarks import op_counts

    x = torch.randn(2, 3, 4)
    assert op_counts.count(lambda: x.movedim(0, 2).unsqueeze(0).transpose(0, 1).flatten(0, 1))[0] == 0
    assert op_counts.count(lambda: x.movedim(0, 2).flatten(1))[0] == 1


@pytest.mark.slow
def test_train_check_trains_a_family_through_fairseq_train(tmp_path):
    """benchmarks.train_check (the GPU check's --fp16 and --amp step, here fp32 on the CPU):
    generated data, fairseq-preprocess, fairseq-train; finite, falling loss."""
    out = tmp_path / "train.json"
    r = forked.run([sys.executable, "-m", "benchmarks.train_check", "--families", "memsizer", "--updates", "8",
                    "--precision", "fp32", "--out", str(out)], cwd=ROOT)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    (run,) = json.loads(out.read_text())["runs"]
    assert run["ok"] and len(run["losses"]) >= 2 and run["losses"][-1] < run["losses"][0] and min(run["wps"]) > 0
    assert run["precision"] == "fp32"
    r = forked.run([sys.executable, "-m", "benchmarks.train_check", "--families", "memsizer", "--out", str(out)],
                   cwd=ROOT)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].endswith(
        f"--out {out} exists; give another file, or --replace to write over it")
    assert json.loads(out.read_text())["runs"] == [run]
    r = forked.run([sys.executable, "-m", "benchmarks.train_check", "--precision", "fp16,fp8", "--out",
                    str(tmp_path / "no.json")], cwd=ROOT)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].endswith(
        "--precision fp8: choose from fp32, fp16, amp") and not (tmp_path / "no.json").exists()


def test_gpu_check_does_not_write_over_an_earlier_check(tmp_path):
    """An OUT that holds an earlier check's log is refused in one line before
    anything runs (a stand-in Python that reports CUDA gets past the device check)."""
    python = tmp_path / "python"
    python.write_text("#!/bin/sh\nexit 0\n")
    python.chmod(0o755)
    out = tmp_path / "out"
    out.mkdir()
    (out / "gpu_check.log").write_text("earlier\n")
    r = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), str(out)], capture_output=True, text=True,
                       env={**os.environ, "PYTHON": str(python)})
    assert r.returncode == 1 and r.stderr.strip() == (f"gpu_check: {out} holds an earlier check (gpu_check.log); "
                                                      f"give another OUT, or move that one away")
    assert (out / "gpu_check.log").read_text() == "earlier\n" and sorted(p.name for p in out.iterdir()) == [
        "gpu_check.log"]


def test_gpu_check_runs_every_step_and_writes_the_block(tmp_path):
    """The check's steps in order, then the block from what they wrote: with a
    stand-in Python that reports CUDA and does nothing but the block, every
    step passes and the block names every file as not measured."""
    python = tmp_path / "python"
    python.write_text(f'#!/bin/sh\n[ "$1 $2" = "-m benchmarks.gpu_block" ] && exec {sys.executable} "$@"\nexit 0\n')
    python.chmod(0o755)
    out = tmp_path / "out"
    r = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), str(out)], capture_output=True, text=True,
                       env={**os.environ, "PYTHON": str(python)})
    assert r.returncode == 0, r.stderr[-3000:]
    assert re.findall(r"^== gpu_check: (\S+)", r.stdout, re.M) == [
        "ops", "train-suite", "decode-suite", "train-suite-bf16", "train-profile", "half-train", "local-suite", "block"]
    assert "== gpu_check: ops (at most 180 s)" in r.stdout
    block = (out / "gpu_check.md").read_text()
    assert "| train memsizer: tokens/s vs softmax with SDPA, context 8192 | not measured | >= 2.0x |  |" in block
    assert "| train flash bf16: tokens/s vs softmax with SDPA, context 2048 | not measured | >= 1.0x |  |" in block
    assert ("Not measured (the check wrote no such file under its OUT): gpu_ops.json, train/results.json, "
            "train-bf16/results.json, decode/results.json, local/results.json, train_profile.json, "
            "train_check.json.") in block


def test_gpu_check_keeps_to_its_time(tmp_path):
    """GPU_CHECK_SECONDS bounds the whole check: a step that outlasts the time
    left (less the block's 30 s) is stopped and named, the steps no time is left
    for are skipped and named, and the block is still written."""
    python = tmp_path / "python"
    python.write_text(f'#!/bin/sh\n[ "$1 $2" = "-m benchmarks.gpu_block" ] && exec {sys.executable} "$@"\n'
                      f'[ "$1" = benchmarks/gpu_ops_check.py ] && exec sleep 60\nexit 0\n')
    python.chmod(0o755)
    out = tmp_path / "out"
    r = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), str(out)], capture_output=True, text=True,
                       env={**os.environ, "PYTHON": str(python), "GPU_CHECK_SECONDS": "45"}, timeout=90)
    assert r.returncode == 1
    limit = int(re.search(r"^== gpu_check: ops \(at most (\d+) s\)", r.stdout, re.M).group(1))
    assert 10 <= limit <= 15  # 45 s less the block's 30, less the seconds bash took to get there
    skipped = ["train-suite", "decode-suite", "train-suite-bf16", "train-profile", "half-train", "local-suite"]
    assert re.findall(r"^== gpu_check: (\S+) skipped: no time left of GPU_CHECK_SECONDS=45$", r.stdout, re.M) == skipped
    assert r.stderr.strip() == ("gpu_check: steps that did not finish: " + f"ops (stopped after {limit} s), "
                                + ", ".join(f"{name} (skipped, no time left)" for name in skipped)
                                + f" (log: {out}/gpu_check.log)")
    assert (out / "gpu_check.md").exists()


def test_gpu_check_refuses_a_bad_time_in_one_line(tmp_path):
    r = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), str(tmp_path / "out")], capture_output=True,
                       text=True, env={**os.environ, "GPU_CHECK_SECONDS": "9m"})
    assert r.returncode == 1 and r.stderr.strip() == "gpu_check: GPU_CHECK_SECONDS=9m: give whole seconds, e.g. 540"


def test_gpu_check_without_a_gpu_says_so_in_one_line(tmp_path):
    if __import__("torch").cuda.is_available():
        pytest.skip("this machine has CUDA: the check would run")
    r = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), str(tmp_path / "out")],
                       capture_output=True, text=True)
    assert r.returncode == 1 and r.stderr.strip() == ("gpu_check: no CUDA device visible to python3's torch on "
                                                      "this machine; run it where one is")


def gpu_out(tmp_path):
    """A folder as scripts/gpu_check.sh leaves it, with made-up figures: gpu_ops.json,
    train/, train-bf16/ and decode/ results; no local suite, no fp16 fairseq-train run."""
    out = tmp_path / "cuda"
    speed = [{"op": op, "T": T, "B": 4, "fwd_bwd_ms": ms} for op, T, ms in [
        ("sdpa-bf16", 16384, 8.7), ("performer-elu-parallel-bf16", 16384, 4.35), ("performer-elu-parallel", 4096, 4.0),
        ("fla-core-chunk_linear_attn-elu-bf16", 4096, 2.6), ("performer-elu-fla-bf16", 4096, 2.0),
        ("fla-core-chunk_linear_attn-elu-bf16", 16384, 3.0), ("performer-elu-fla-bf16", 16384, 6.0),
        ("performer-favor-parallel-bf16", 16384, float("nan"))]]  # out of memory
    parity = [{"family": "performer-elu", "form": "parallel", "T": 7, "out_vs_naive": 3e-7, "grad_vs_naive": 2e-6},
              {"family": "performer-elu", "form": "step", "T": 7, "out_vs_naive": 5e-7}]
    low = [{"family": "performer-elu", "form": "parallel", "T": 4096, "dtype": d, "finite": True,
            "rel_err_vs_fp32": e} for d, e in (("torch.float16", 1e-3), ("torch.bfloat16", 4e-3))]
    (out / "train").mkdir(parents=True)
    (out / "decode").mkdir()
    trained = [{"family": "flash", "form": "fused-train", "T": 2048, "dtype": "bfloat16", "ran": "yes",
                "loss_vs_torch": 2e-7, "grad_vs_torch": 3e-5, "torch_ms": 30.0, "kernels_ms": 12.0,
                "tiles": "32 tokens x 8 warps", "tile_ms": {"16 tokens x 8 warps": 4.5, "32 tokens x 8 warps": 3.25}},
               {"family": "performer", "form": "fused-train", "T": 16, "dtype": "float32", "ran": "yes",
                "loss_vs_torch": 1e-7, "grad_vs_torch": 1e-6}]  # timed on CUDA only
    (out / "gpu_ops.json").write_text(json.dumps({"device": "NVIDIA H200", "torch": "2.11.0+cu130", "triton": "3.6.0",
                                                  "fla_core": "0.6.0", "fla_core_gate": "Triton 3.6.0 builds it wrongly",
                                                  "parity": parity, "low_precision": low, "speed": speed,
                                                  "fused_training": trained}))
    tok = lambda family, value, **key: {"family": family, "status": "ok", "tokens_per_s": {"median": value}, **key}  # noqa: E731
    train = [tok(f, v, ctx=T) for T, row in ((2048, {"transformer_sdpa": 400.0, **dict.fromkeys(report.LINEAR, 500.0)}),
                                            (8192, {"transformer_sdpa": 200.0, **dict.fromkeys(report.LINEAR, 300.0)}))
             for f, v in row.items()]
    decode = [tok(f, v, L=256, batch=1) for f, v in {"transformer": 200.0, **dict.fromkeys(report.LINEAR, 250.0)}.items()]
    (out / "train" / "results.json").write_text(json.dumps({"train": train, "created": "2026-12-05T12:00:00+00:00",
                                                            "code": "0123456789abcdef"}))
    (out / "decode" / "results.json").write_text(json.dumps({"decode": decode}))
    (out / "train-bf16").mkdir()
    bf16 = [tok(f, v, ctx=2048) for f, v in {"transformer_sdpa": 800.0, "flash": 600.0}.items()]
    (out / "train-bf16" / "results.json").write_text(json.dumps({"train": bf16}))
    (out / "train_profile.json").write_text(json.dumps([
        {"family": "flash", "params": 7.88e6, "ctx": 2048, "batch": 4, "dtype": "bfloat16", "step_ms": 20.5,
         "launches": 1400, "top": [{"op": "aten::mul", "calls": 160, "ms": 3.0, "share": 0.25}]}]))
    return out


def test_gpu_block_reads_the_check_and_holds_each_target(tmp_path):
    """benchmarks.gpu_block: the issue's GPU targets computed from the check's JSON
    (ratios, met or not), the parity rows, the files the check did not write
    named, and --readme replacing only the gpu block."""
    from benchmarks import gpu_block

    out = gpu_out(tmp_path)
    readme = tmp_path / "perf.md"
    readme.write_text(f"before\n{gpu_block.BEGIN}\nold\n{gpu_block.END}\nafter\n")
    r = forked.run([sys.executable, "-m", "benchmarks.gpu_block", str(out), "--readme", str(readme)], cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    text = (out / "gpu_check.md").read_text()
    assert text.startswith("Measured by `bash scripts/gpu_check.sh` on NVIDIA H200, torch 2.11.0+cu130, Triton 3.6.0, "
                           "fla-core: 0.6.0 (RFA's gate trained on torch: Triton 3.6.0 builds it wrongly); suites run "
                           "2026-12-05T12:00:00+00:00, code digest 0123456789abcdef.")
    for row in ("| performer-elu parallel (torch) bf16: SDPA bf16's time / ours, T=16384 | 2.00x | >= 1.0x | yes |",
                "| performer-elu parallel fp32: the first GPU run's chunk loop / ours, T=4096 | 22.90x | >= 20.0x | yes |",
                "| performer-elu fla bf16: fla-core's chunk_linear_attn time / ours (within 1.3x), T=4096 | 1.30x | "
                ">= 0.77x | yes |",
                "| performer-elu fla bf16: fla-core's chunk_linear_attn time / ours (within 1.3x), T=16384 | 0.50x | "
                ">= 0.77x | **no** |",
                "| train memsizer: tokens/s vs softmax with SDPA, context 2048 | 1.25x | >= 1.0x | yes |",
                "| train flash: tokens/s vs softmax with SDPA, context 8192 | 1.50x | >= 2.0x | **no** |",
                "| train flash bf16: tokens/s vs softmax with SDPA, context 2048 | 0.75x | >= 1.0x | **no** |",
                "| train memsizer bf16: tokens/s vs softmax with SDPA, context 2048 | not measured | >= 1.0x |  |",
                "| decode performer: softmax's ms a step / ours, L=256, batch 1 | 1.25x | >= 1.0x | yes |",
                "| performer-favor parallel (torch) bf16: SDPA bf16's time / ours, T=16384 | not measured | >= 1.0x |  |",
                "| performer-elu | 5.0e-07 / 2.0e-06 | yes | 4.0e-03 |",
                "| flash (bfloat16, 2 x 2048 tokens) | yes | 2.0e-07 / 3.0e-05 | 30.0 / 12.0 (2.50x) | 32 tokens x 8 "
                "warps (16 tokens x 8 warps 4.50, 32 tokens x 8 warps 3.25) |",
                "| performer (float32, 2 x 16 tokens) | yes | 1.0e-07 / 1.0e-06 | not timed | - |"):
        assert row in text, row
    assert "| flash (7.88M, ctx 2048, batch 4) | bfloat16 | 20.5 | 1400 | mul x160 25% |" in text
    assert "Not measured (the check wrote no such file under its OUT): local/results.json, train_check.json." in text
    assert readme.read_text() == f"before\n{gpu_block.BEGIN}\n{text}{gpu_block.END}\nafter\n"
    assert "Failed in gpu_ops.json" not in text
    r = forked.run([sys.executable, "-m", "benchmarks.gpu_block", str(tmp_path / "nowhere")], cwd=ROOT)
    assert r.returncode == 1 and r.stderr.strip() == (f"benchmarks.gpu_block: {tmp_path / 'nowhere'} is not a folder; "
                                                      f"give the OUT of scripts/gpu_check.sh")
    ops = json.loads((out / "gpu_ops.json").read_text())
    del ops["speed"]
    (out / "gpu_ops.json").write_text(json.dumps({**ops, "speed_error": "RuntimeError: no kernel"}))
    text = gpu_block.block(out)
    assert text.rstrip().endswith("Failed in gpu_ops.json: speed (RuntimeError: no kernel).")
    assert "| performer-elu | 5.0e-07 / 2.0e-06 | yes | 4.0e-03 |" in text
    (out / "train_check.json").write_text(json.dumps({"updates": 40, "runs": [
        {"family": "flash", "precision": "fp16", "ok": True, "losses": [9.1, 4.25], "wps": [1000.0, 52000.0]},
        {"family": "flash", "precision": "amp", "ok": False, "error": "FloatingPointError"}]}))
    text = gpu_block.block(out)
    assert "| flash | fp16 | yes | 9.10 / 4.25 | 52,000 |" in text and "| flash | amp | **no** | - | - |" in text
