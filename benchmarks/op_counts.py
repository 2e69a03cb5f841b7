"""How many operators each family's model runs: a CPU proxy for GPU launch cost.

    python -m benchmarks.op_counts [--families transformer,memsizer] [--out FILE.json] [--replace]

On a GPU every aten operator launches at least one kernel, so a form whose
operator count grows with the sequence length launches O(T) kernels. With the
benchmark suites' LMs (benchmarks/models.py, batch 1), torch.profiler counts
the aten operators that do work (views and allocations left out) and call
no other such operator, or only copies of a strided input into a contiguous
one (a layer norm or softmax then runs its own kernel on the copy), one per
kernel a GPU would launch, of

  train   one forward + backward at T = 256, 1024 and 4096 tokens, as the train
          suite times it (gradients None before it, as fairseq's trainer leaves
          them, so no operator adds into earlier gradients), and a decoder
          layer's share of it at T = 256 (the LM with one layer more, less the
          LM: a FLASH layer is a GAU);
  decode  one incremental decoding step after a prefix of 64 and of 512 tokens,
          for the whole model and per decoder layer (the ops run inside
          decoder.layers[i], averaged over the layers; a FLASH layer is a GAU,
          which stands in for attention and FFN); then greedy search's reorder
          of the state (0..B-1, which fairseq asks for after every step); and
          the values the step and the reorder read back to the host, each a
          wait for the device on a GPU (the plugin's ops take their GPU path
          for both: ops.common.reads_back_free).

A row whose modules can run on Triton kernels on CUDA (they have
runs_on_triton: `--memsizer-backend`, `--kernel-backend`, `--gau-backend`,
`--local-backend`) gets a "+triton" row, where Triton imports, counted on the
CPU through Triton's interpreter, each launch one operator (the interpreter's
copies of the arguments inside it do not count):

  decode  the prefix fills the state on the torch step, then the counted step
          runs on the kernels;
  train   where the training pass launches Triton kernels (kernel attention
          on fla-core's and its own FAVOR+ feature kernels, where fla-core
          imports; FLASH's causal units on their mixed chunk kernels; the
          sliding window on its kernels), each launch is counted and not run
          (the count does not depend on the values); elsewhere the row trains
          as the family's torch row and shows no training count.

Counts, not timings: the numbers do not depend on the machine's speed.
Writes JSON and a markdown table beside it; an existing FILE.json (the
committed counts by default) is rewritten only with --replace.
"""
import argparse
import contextlib
import json
import os
import sys
from pathlib import Path
from unittest import mock

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from linear_fairseq import families as family_list
from linear_fairseq.modules.attention import option_names
from linear_fairseq.ops import common
from linear_fairseq.ops.common import triton_unavailable

from . import models, suites

TRAIN_LENGTHS = (256, 1024, 4096)
PREFIXES = (64, 512)
LAYER = "op_counts.layer"
TRITON = "triton::"  # a profiled Triton launch (triton_launches_profiled)
READ = "aten::_local_scalar_dense"  # a value read back to the host (item, bool, int of a tensor)


# operators that only describe memory (views, allocation, no-op conversions): no kernel of their own
METADATA = {f"aten::{name}" for name in (
    "view", "as_strided", "_unsafe_view", "_reshape_alias", "reshape", "resolve_conj", "resolve_neg", "detach",
    "detach_", "empty", "empty_strided", "empty_like", "expand", "expand_as", "permute", "transpose", "t",
    "unsqueeze", "squeeze", "select", "slice", "alias", "unflatten", "flatten", "movedim", "moveaxis", "split",
    "split_with_sizes",
    "chunk", "narrow", "unbind", "lift_fresh", "to", "numpy_T", "view_as", "set_", "new_empty",
    "view_as_complex", "view_as_real", "mT", "mH", "adjoint", "unfold",
    "dropout")}  # in eval an identity; in training its own operators (bernoulli_, mul) count


def works(event) -> bool:
    return event.name.startswith(TRITON) or (event.name.startswith("aten::") and event.name not in METADATA)


def within(event, prefix: str) -> bool:
    """Whether an enclosing event's name starts with prefix."""
    event = event.cpu_parent
    while event is not None:
        if event.name.startswith(prefix):
            return True
        event = event.cpu_parent
    return False


def leaf_aten(prof) -> list:
    """The profiled aten operators that do work (not METADATA) and call no other
    such operator, those whose only such calls copy a strided input into a
    contiguous one (a layer norm or softmax then runs its own kernel on the copy),
    and the Triton launches: one per kernel a GPU would launch, composites
    counted once, nothing inside a launch counted again."""
    def below(e):
        return any(works(c) or below(c) for c in e.cpu_children)

    def copies_first(e):
        return all(c.name == "aten::contiguous" for c in e.cpu_children if works(c) or below(c))

    return [e for e in prof.events() if works(e) and not within(e, TRITON)
            and (e.name.startswith(TRITON) or not below(e) or copies_first(e))]


@contextlib.contextmanager
def triton_launches_profiled(run: bool = True):
    """Each launch of a Triton kernel under Triton's interpreter as one profiled
    event, "triton::<kernel>" (the interpreter must be on: TRITON_INTERPRET=1
    before Triton is imported). run=False: a launch is counted and not run (its
    outputs keep what they were allocated with), and an autotuned kernel is one
    launch, not one for each configuration its autotuner would try: fla-core's
    kernels, which the interpreter would run for minutes."""
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.interpreter import InterpretedFunction

    saved = InterpretedFunction.run, Autotuner.run

    def launch(name, run_it):
        def profiled(self, *args, **kwargs):
            with record_function(TRITON + name(self)):
                return run_it(self, *args, **kwargs) if run else None
        return profiled

    InterpretedFunction.run = launch(lambda k: k.fn.__name__, saved[0])
    if not run:
        Autotuner.run = launch(lambda k: k.base_fn.__name__, saved[1])
    try:
        yield
    finally:
        InterpretedFunction.run, Autotuner.run = saved


def in_layer(event) -> bool:
    return event.name == LAYER or within(event, LAYER)


def count(fn, layers=()) -> tuple:
    """(leaf aten ops of fn() and Triton launches, of those run inside `layers`, the launches,
    the values read back to the host)."""
    handles = []
    for layer in layers:
        scope = {}
        handles.append(layer.register_forward_pre_hook(lambda m, a, s=scope: s.update(r=record_function(LAYER).__enter__())))
        handles.append(layer.register_forward_hook(lambda m, a, o, s=scope: s["r"].__exit__(None, None, None)))
    try:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fn()
    finally:
        for h in handles:
            h.remove()
    ops = leaf_aten(prof)
    reads = sum(1 for e in prof.events() if e.name == READ and not within(e, TRITON))
    return (len(ops), sum(1 for e in ops if in_layer(e)), sum(1 for e in ops if e.name.startswith(TRITON)),
            reads)


def train_ops(model, T: int, triton: bool = False) -> tuple:
    """(operators, Triton launches among them) of one training pass over T tokens, as
    the train suite times it (suites.train_pass: the gradients None before it, the
    next-token loss); triton: the modules told they run on Triton (kernel attention
    then trains on fla-core's kernels and its feature kernels, FLASH's causal units
    on their mixed chunk kernels; each launch counted, not run)."""
    model.train()
    tokens = torch.randint(4, models.VOCAB, (1, T + 1))
    with training_on_triton(model) if triton else contextlib.nullcontext():
        suites.train_pass(model, tokens)  # first call: lazy buffers, caches
        total, _, launched, _ = count(lambda: suites.train_pass(model, tokens))
    return total, launched


def one_layer_more(model, family: str, extra=()):
    """The LM of `family` (with `extra`) with one decoder layer more than `model`: its
    training pass less `model`'s is a decoder layer's share (autograd's backward runs
    outside the layers' forward hooks, so the difference is what counts it)."""
    return models.build("lm", family, extra=[*extra, "--decoder-layers", str(len(model.decoder.layers) + 1)])[0]


def decode_ops(model, prefix: int, triton: bool = False) -> dict:
    """The counts of one decoding step after `prefix` steps, then of greedy search's
    reorder (0..B-1, which fairseq asks for after every step), both read as on a GPU
    (reads_on_gpu), the prefix too (its state then as a GPU holds it); triton: the step
    on the Triton kernels (the prefix's steps fill the same state on the torch path)."""
    model.eval()
    tokens = torch.randint(4, models.VOCAB, (1, prefix + 1))
    state = {}
    with torch.no_grad(), reads_on_gpu():
        for t in range(1, prefix + 1):
            model.decoder(tokens[:, :t], incremental_state=state)
        layers = list(model.decoder.layers)
        with on_triton(model) if triton else contextlib.nullcontext():
            total, inside, _, reads = count(lambda: model.decoder(tokens, incremental_state=state), layers)
            keep = torch.arange(tokens.shape[0])
            reorder, _, _, reorder_reads = count(lambda: model.decoder.reorder_incremental_state_scripting(state, keep))
    return {"step": total, "per_layer": inside / len(layers), "layers": len(layers), "reorder": reorder,
            "reads": reads + reorder_reads}


def reads_on_gpu():
    """The plugin's ops told that reading a value back to the host is not free
    (ops.common.reads_back_free), so they take the path a GPU runs (a context manager)."""
    return mock.patch.object(common, "reads_back_free", lambda x: False)


def triton_modules(model) -> list:
    """The model's modules that can run on Triton kernels (they have runs_on_triton)."""
    return [m for m in model.modules() if hasattr(m, "runs_on_triton")]


@contextlib.contextmanager
def told_triton(model):
    """The model's modules that can run on Triton kernels told they do (their own
    choice again after); yields those modules."""
    modules = triton_modules(model)
    for m in modules:
        m.runs_on_triton = lambda x: True
    try:
        yield modules
    finally:
        for m in modules:
            del m.runs_on_triton


@contextlib.contextmanager
def on_triton(model):
    """told_triton, each launch profiled as one event, for the block."""
    with told_triton(model), triton_launches_profiled():
        yield


@contextlib.contextmanager
def training_on_triton(model):
    """told_triton, each launch profiled as one event and not run (the training kernels)."""
    with told_triton(model), triton_launches_profiled(run=False):
        yield


# local precision (--short-conv, --local-window) as a row of its own, for the families that offer it
LOCAL = ("--short-conv", "4", "--local-window", "64")


def rows(families) -> list:
    """(row name, family, extra flags): each family, then each that offers local
    precision (its options have short_conv) with LOCAL."""
    local = [(f"{f}+local", f, LOCAL) for f in families
             if f in models.FAMILIES[1:] and "short_conv" in option_names(family_list.get(f))]
    return [(f, f, ()) for f in families] + local


def triton_missing():
    """Why Triton's kernels cannot be counted here (None: they can)."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return "they are counted through Triton's interpreter (TRITON_INTERPRET=1, set where there is no CUDA)"
    return triton_unavailable()


def train_counts(model, family: str, extra=(), triton: bool = False) -> dict:
    """{"train": {T: operators}, "train_per_layer": a decoder layer's share at the first
    T}; triton: on the Triton kernels, {"train": None} where the training pass launches
    none (it is then the torch row's)."""
    counts = {T: train_ops(model, T, triton) for T in TRAIN_LENGTHS}
    if triton and not any(launched for _, launched in counts.values()):
        return {"train": None}
    first = TRAIN_LENGTHS[0]
    deeper = train_ops(one_layer_more(model, family, extra), first, triton)[0]
    return {"train": {str(T): n for T, (n, _) in counts.items()}, "train_per_layer": deeper - counts[first][0]}


def measure(families) -> dict:
    torch.manual_seed(0)
    out = {}
    for name, family, extra in rows(families):
        model, _, info = models.build("lm", family, extra=extra)
        out[name] = {"arch": info["arch"], "args": info["args"], **train_counts(model, family, extra),
                     "decode": {str(L): decode_ops(model, L) for L in PREFIXES}}
        print(f"{name}: {out[name]['train']} {out[name]['decode']}", flush=True)
        if triton_modules(model):
            why = triton_missing()
            if why:
                print(f"{name}+triton: not counted: {why}", flush=True)
                continue
            out[f"{name}+triton"] = {"arch": info["arch"], "args": info["args"], "triton": True,
                                     **train_counts(model, family, extra, triton=True),
                                     "decode": {str(L): decode_ops(model, L, triton=True) for L in PREFIXES}}
            print(f"{name}+triton: {out[f'{name}+triton']['train']} {out[f'{name}+triton']['decode']}", flush=True)
    return out


def table(results: dict) -> str:
    lines = ["| family | train ops " + " | ".join(f"T={T}" for T in TRAIN_LENGTHS) + " | per layer | decode step ops "
             + " | ".join(f"after {L}" for L in PREFIXES) + " | per layer (layers) | greedy reorder | reads a step |",
             "| --- " * (5 + len(TRAIN_LENGTHS) + len(PREFIXES)) + "|"]
    for family, r in results.items():
        last = r["decode"][str(PREFIXES[-1])]
        lines.append(f"| {family} | " + " | ".join(str(r["train"][str(T)]) if r["train"] else "–"
                                                  for T in TRAIN_LENGTHS)
                     + f" | {r['train_per_layer'] if r['train'] else '–'} | "
                     + " | ".join(str(r["decode"][str(L)]["step"]) for L in PREFIXES)
                     + f" | {last['per_layer']:.0f} ({last['layers']}) | {last['reorder']} | {last['reads']} |")
    return "\n".join(lines).replace("| family | train ops T=", "| family | train T=") + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--families", default=",".join(models.FAMILIES))
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/cpu/op-counts.json"))
    ap.add_argument("--replace", action="store_true", help="rewrite --out where it holds earlier counts")
    args = ap.parse_args(argv)
    families = models.family_list(ap, args.families)
    if args.out.exists() and not args.replace:
        sys.exit(f"benchmarks.op_counts: {args.out} holds earlier counts; --replace to count anew (rewriting "
                 f"it), or another --out")
    torch.set_num_threads(1)
    if not torch.cuda.is_available():  # Triton kernels run (and are counted) through the interpreter
        os.environ.setdefault("TRITON_INTERPRET", "1")
    results = measure(families)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"torch": torch.__version__, "batch": 1, "results": results}, indent=1))
    args.out.with_suffix(".md").write_text(
        "Aten operators that do work (views, allocations left out; composites counted once, and an operator "
        "that first copies a strided input, with its copy) per "
        "forward+backward (train, batch 1) and per incremental decoding step, then of greedy search's reorder "
        "after the step, and the values the step and reorder read back to the host as on a GPU "
        "(`python -m benchmarks.op_counts`); +local: with `" + " ".join(LOCAL) + "`; +triton: on the Triton "
        "kernels a CUDA run takes (decoding on the plugin's steps, training on the Triton kernels where the "
        "family's does: fla-core's and the FAVOR+ feature kernels, FLASH's mixed chunk kernels, the sliding "
        "window's kernels; no training count: it trains as its torch row), counted here through Triton's "
        "interpreter, a launch one operator (the training kernels counted, not run):\n\n"
        + table(results))
    print(table(results))


if __name__ == "__main__":
    main()
