"""The Triton kernels the models launch compile for the GPUs the project trains on,
checked without one (benchmarks.triton_compile: Triton's compiler down to the cubin,
for sm_90)."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import triton_compile

ROOT = Path(__file__).resolve().parents[1]


def test_every_kernel_launch_compiles_for_sm_90(tmp_path):
    """Every launch the benchmark models make on Triton compiles for sm_90 (H100, H200)
    and fits its shared memory; the interpreter the other tests run them in checks
    neither. Decoding: the plugin's kernels, each family's LM and translation model
    with its defaults and each Family.variants option set (FLASH's GAU step with and
    without RoPE and the relative bias; kernel attention's step with FAVOR+ computed
    in the kernel, RFA's gate, elu, RFA, T2R), in float32, bfloat16 and float16, with
    and without a padded step. Training: FAVOR+'s feature kernels, forward and
    gradient, and fla-core's chunked kernels, forward and backward, on kernel
    attention's inputs (FAVOR+'s 266 features a head, the normalizer's column
    beside the values, RFA's gate); FLASH's five mixed chunk kernels over two
    chunks, with RoPE and without, each relu^2 normalization, with each of the tiles
    a GPU chooses from, their half products on the tensor cores. MemSizer's decoding
    step; the sliding window's step, and its training kernels (the causal forward
    and backward in the LMs' training passes, the non-causal forward in a
    translation encoder, padded and not)."""
    pytest.importorskip("triton.backends.nvidia", reason="the check compiles with Triton's NVIDIA backend")
    from linear_fairseq.ops import mixed_chunk_triton

    out = tmp_path / "compile.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compilable kernels
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")  # each kernel compiled here, none taken from a cache
    r = subprocess.run([sys.executable, "-m", "benchmarks.triton_compile", "--out", str(out)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    records = json.loads(out.read_text())["records"]
    assert records and all(rec["ok"] and rec["arch"] == "sm_90" for rec in records)
    assert all(rec["shared_bytes"] <= triton_compile.SHARED[90] for rec in records)
    ours = [rec for rec in records if rec["kernel"].startswith("linear_fairseq.")]
    chunked = [rec for rec in ours if ".mixed_chunk_triton." in rec["kernel"]]
    # registers: none of the other kernels needs all 255 a thread has (where it would spill);
    # stack: at most the frame of sin and cos (RoPE's turn), which spilled registers would add to
    others = [rec for rec in ours if rec not in chunked]
    assert all(rec["registers"] < 255 and rec["stack_bytes"] <= 32 for rec in others), others
    assert all(rec["stack_bytes"] == 0 for rec in others if "rope" in rec["row"] or "performer" in rec["row"])
    # FLASH's training kernels, with each of the tiles a GPU chooses from: in float32 (IEEE products) a
    # small frame, as some Triton versions and the wider tiles keep in the query and key kernels, no more
    # than 64 bytes, in half precision at most 8; they need at most all 255 registers
    assert all(rec["registers"] <= 255 and rec["stack_bytes"] <= 64 for rec in chunked), chunked
    assert all(rec["stack_bytes"] <= 8 for rec in chunked if rec["dtype"] != "float32"), chunked
    tiles = {(rec["kernel"], rec["dtype"], rec["tiles"]["BLOCK_T"], rec["tiles"]["num_warps"]) for rec in chunked}
    assert tiles == {(kernel, dtype, *t) for kernel in {rec["kernel"] for rec in chunked}
                     for dtype in ("float32", "bfloat16", "float16") for t in mixed_chunk_triton.TILES}
    # their products: float32 ones on the FMA units (IEEE), half ones on the tensor cores in their own precision
    operands = {"float32": [], "bfloat16": ["bf16"], "float16": ["f16"]}
    assert all(rec["tensor_cores"] == operands[rec["dtype"]] for rec in chunked), chunked
    kernels = {rec["kernel"] for rec in ours}
    decoding = {f"linear_fairseq.ops.{name}" for name in (
        "flash_triton._gau_step_kernel", "performer_triton._step_kernel", "memsizer_triton._step_kernel",
        "local_triton._window_step_kernel")}
    training = {"linear_fairseq.ops.favor_triton._forward_kernel", "linear_fairseq.ops.favor_triton._backward_kernel",
                *(f"linear_fairseq.ops.mixed_chunk_triton.{name}" for name in (
                    "_chunk_sums_kernel", "_forward_kernel", "_chunk_grads_kernel", "_queries_kernel", "_keys_kernel")),
                "linear_fairseq.ops.local_triton._backward_kernel"}
    both = {"linear_fairseq.ops.local_triton._forward_kernel"}  # a translation encoder's window while decoding
    assert kernels == decoding | training | both
    for kernel in kernels:
        cases = {(rec["dtype"], rec["padded"]) for rec in ours if rec["kernel"] == kernel}
        padded = (False,) if kernel in training else (False, True)  # the training pass runs unpadded blocks
        assert cases == {(d, p) for d in ("float32", "bfloat16", "float16") for p in padded}, kernel
    # the window's forward: non-causal in a translation encoder (decoding), causal in an LM's training pass
    passes = {(rec["pass"], rec["dtype"]) for rec in ours if rec["kernel"] in both}
    assert passes == {(p, d) for p in ("decode", "train") for d in ("float32", "bfloat16", "float16")}
    assert {"flash lm", "flash mt_relbias", "flash lm_no_rope", "performer lm", "performer lm_favor_gate",
            "performer mt_rfa", "performer mt_elu"} <= {rec["row"] for rec in ours}
    if importlib.util.find_spec("fla") is not None:
        trained = {(rec["kernel"].rsplit(".", 1)[-1], rec["dtype"]) for rec in records if rec["pass"] == "train"}
        for name in ("chunk_fwd_kernel_h", "chunk_fwd_kernel_o", "chunk_bwd_kernel_dh", "chunk_bwd_kernel_dqkwg",
                     "chunk_bwd_kernel_dv"):
            assert {(name, d) for d in ("float32", "bfloat16")} <= trained, name  # float16 runs it in float32
        assert ("chunk_local_cumsum_scalar_kernel", "float32") in trained  # RFA's gate, summed in float32
    assert " compiles ok" in r.stdout
    table = out.with_suffix(".md").read_text()  # and a row a kernel in the table beside the JSON
    assert all(f"| `{rec['kernel'].removeprefix('linear_fairseq.ops.')}` |" in table for rec in records)


def test_the_window_backward_keeps_to_its_registers_on_every_gpu(tmp_path):
    """The sliding window's backward compiles for each GPU with the tiles it launches
    with there (local_triton.backward_tiles): 16 queries or keys a program on sm_70 and
    sm_75, 32 on sm_80 and sm_90; none spills registers to memory (no stack), in float32
    and float16 (--families: MemSizer's models alone)."""
    pytest.importorskip("triton.backends.nvidia", reason="the check compiles with Triton's NVIDIA backend")
    out = tmp_path / "compile.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")
    r = subprocess.run([sys.executable, "-m", "benchmarks.triton_compile", "--arch", "70,75,80,90", "--passes", "train",
                        "--families", "memsizer", "--dtypes", "float32,float16", "--out", str(out)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    records = json.loads(out.read_text())["records"]
    assert {rec["row"].split()[0] for rec in records} == {"memsizer"}
    backward = [rec for rec in records if rec["kernel"] == "linear_fairseq.ops.local_triton._backward_kernel"]
    assert {(rec["arch"], rec["tiles"]["BLOCK"], rec["dtype"]) for rec in backward} == {
        (f"sm_{arch}", 16 if arch < 80 else 32, dtype) for arch in (70, 75, 80, 90) for dtype in ("float32", "float16")}
    assert all(rec["ok"] and rec["stack_bytes"] == 0 and rec["registers"] <= 255 for rec in backward), backward


def test_a_tiling_short_of_shared_memory_is_left_out_only_where_another_compiles():
    """benchmarks.triton_compile.left_out: a tiling of FLASH's training kernels that needs more
    shared memory than the architecture gives is no failure where another tiling of the same
    launch compiles (its GPU's choice of tiles leaves it out); it stays one where none does,
    where the failure is the compiler's, or for a kernel whose tiles are fixed."""
    forward = "linear_fairseq.ops.mixed_chunk_triton._forward_kernel"
    where = dict(arch="sm_86", dtype="float32", row="flash lm", padded=False, **{"pass": "train"})
    short = dict(ok=False, error="needs 116736 bytes of shared memory; sm_86 offers 101376", shared_needed=116736)
    records = [
        {"kernel": forward, **where, "ok": True, "tiles": {"BLOCK_T": 16}},
        {"kernel": forward, **where, **short, "tiles": {"BLOCK_T": 32}},  # left out
        {"kernel": forward, **where, "arch": "sm_89", **short},  # no tiling compiles there
        {"kernel": forward, **where, "dtype": "bfloat16", "ok": False, "error": "CompilationError: ..."},
        {"kernel": "linear_fairseq.ops.flash_triton._gau_step_kernel", **where, **short},
        {"kernel": "linear_fairseq.ops.flash_triton._gau_step_kernel", **where, "ok": True},
    ]
    assert triton_compile.left_out(records) == [records[1]]
    assert "left_out" in records[1] and not any("left_out" in r for r in records[2:])


def test_the_table_gives_each_kernel_its_worst_case_on_each_architecture(tmp_path):
    """write_table: beside FILE.json, FILE.md has one row a kernel: the specializations
    compiled (tilings left out counted apart), on each architecture the most registers and
    stack bytes a thread of those that compiled, the most shared memory, the tensor-core
    operand types; an architecture where none compiled reads "–"."""
    step, sums = "linear_fairseq.ops.flash_triton._gau_step_kernel", "fla.ops.common.chunk_h.chunk_fwd_kernel_h"
    fit = dict(ok=True, shared_bytes=1024, tensor_cores=[])
    records = [
        {"kernel": step, "arch": "sm_70", **fit, "registers": 190, "stack_bytes": 32},
        {"kernel": step, "arch": "sm_70", **fit, "registers": 120, "stack_bytes": 2048, "shared_bytes": 4096},
        {"kernel": step, "arch": "sm_90", **fit, "registers": 115, "stack_bytes": 0},
        {"kernel": step, "arch": "sm_90", "ok": False, "left_out": "its GPU chooses other tiles", "registers": 255},
        {"kernel": sums, "arch": "sm_70", "ok": False, "error": "CompilationError"},
        {"kernel": sums, "arch": "sm_90", **fit, "registers": 168, "stack_bytes": 0, "tensor_cores": ["tf32"]},
    ]
    path = tmp_path / "compile.json"
    triton_compile.write_table(path, {"triton": "3.8.0", "torch": "2.13", "archs": [70, 90], "records": records})
    rows = [line for line in (tmp_path / "compile.md").read_text().splitlines() if line.startswith("| `")]
    assert rows == ["| `flash_triton._gau_step_kernel` | 3 of 4 (1 left out) | 190 / 2,048 | 115 / 0 | 4,096 | none |",
                    "| `fla.ops.common.chunk_h.chunk_fwd_kernel_h` | 1 of 2 | – / – | 168 / 0 | 1,024 | tf32 |"]


def test_interpreted_kernels_are_refused_in_one_line(capsys, monkeypatch):
    """Under TRITON_INTERPRET=1 (as the tests run without CUDA) the kernels are not
    compilable functions: one line says so."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert triton_compile.main([]) == 1
    assert capsys.readouterr().err.strip().splitlines() == [
        "triton_compile: TRITON_INTERPRET=1 makes the kernels interpreted functions: run it without"]


def test_a_bad_architecture_is_named(capsys):
    with pytest.raises(SystemExit):
        triton_compile.main(["--arch", "61"])
    assert "--arch 61: choose from 70, 75, 80, 86, 89, 90" in capsys.readouterr().err


def test_an_unknown_family_is_named(capsys):
    with pytest.raises(SystemExit):
        triton_compile.main(["--families", "memsizer,mamba"])
    assert "--families 'mamba': choose from flash, memsizer, performer" in capsys.readouterr().err


def test_an_earlier_check_is_not_overwritten(tmp_path, capsys, monkeypatch):
    """--out naming a file that exists is refused in one line, before anything is compiled."""
    pytest.importorskip("triton.backends.nvidia", reason="the check compiles with Triton's NVIDIA backend")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    earlier = tmp_path / "compile.json"
    earlier.write_text("{}")
    assert triton_compile.main(["--out", str(earlier)]) == 1
    assert capsys.readouterr().err.strip().splitlines() == [
        f"triton_compile: {earlier} holds an earlier check; --replace to check anew (rewriting it), or another --out"]
    assert earlier.read_text() == "{}"


def test_a_launch_makes_its_inputs_gpu_the_current_one(monkeypatch, triton_device):
    """Triton launches a kernel on the current CUDA device: an entry point of the kernels
    (ops.triton_common.on_its_device) makes its first tensor's (or torch.device's) GPU the
    current one while it runs where another one is, and leaves it alone elsewhere."""
    import torch

    from linear_fairseq.ops import triton_common

    entered, ran = [], []

    class Device:  # stands in for torch.cuda.device (no GPU here)
        def __init__(self, device):
            self.device = device

        def __enter__(self):
            entered.append(self.device)

        def __exit__(self, *exc):
            entered.append("left")

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device", Device)
    launch = triton_common.on_its_device(lambda *args, **kwargs: ran.append(list(entered)) or len(ran))
    assert launch(torch.zeros(1), 3) == 1 and entered == []  # a CPU tensor: nothing to change
    assert launch(torch.device("cuda", 0), key=1) == 2 and entered == []  # already the current one
    assert launch(torch.device("cuda", 1)) == 3 and entered == [torch.device("cuda", 1), "left"]
    assert ran[-1] == [torch.device("cuda", 1)]  # it ran while that GPU was current
