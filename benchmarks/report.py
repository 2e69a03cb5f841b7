"""Tables, targets and plots from a results dict (benchmarks/run.py)."""
import os
from functools import partial
from pathlib import Path

import linear_fairseq  # noqa: F401  registers the families
from linear_fairseq import families as family_list

from .suites import LOCAL

BEGIN, END = "<!-- benchmarks:begin -->", "<!-- benchmarks:end -->"
BASELINE = family_list.BASELINE.name
LINEAR = family_list.names(baseline=False)


def ok(records):
    return [r for r in records or [] if r["status"] == "ok"]


def matches(record, key) -> bool:
    return all(record.get(k) == v for k, v in key.items())


def metric_value(record, metric):
    """A measurement's median, or the value itself when it is a single number."""
    value = record[metric]
    return value["median"] if isinstance(value, dict) else value


def lookup(records, metric, **key):
    for r in ok(records):
        if matches(r, key):
            return metric_value(r, metric)
    return None


# -- targets: the speed and memory goals each family is held to ----------------------------------
def target(name, value, threshold, unit="x"):
    return {"name": name, "value": value, "threshold": threshold, "unit": unit,
            "met": None if value is None else value >= threshold}


def ratio(a, b):
    return None if a is None or b is None else a / b


def targets(results):
    out = []
    dec = results.get("decode")
    if dec is not None:
        base = lookup(dec, "tokens_per_s", family=BASELINE, L=4096, batch=16)
        for f in LINEAR:
            mine = lookup(dec, "tokens_per_s", family=f, L=4096, batch=16)
            out.append(target(f"decode {f}: tokens/s vs transformer_lm, L=4096, batch 16", ratio(mine, base), 5.0))
            short = lookup(dec, "tokens_per_s", family=f, L=256, batch=16)
            out.append(target(f"decode {f}: tokens/s at L=4096 / at L=256, batch 16", ratio(mine, short), 0.85))
            for B in sorted({r["batch"] for r in ok(dec)}):
                sizes = {r["L"]: r["state_bytes_per_seq"] for r in ok(dec) if r["family"] == f and r["batch"] == B}
                constant = None if len(sizes) < 2 else float(max(sizes.values()) == min(sizes.values()))
                out.append(target(
                    f"decode {f}: state bytes per sequence constant over L={sorted(sizes)}, batch {B}",
                    constant, 1.0, unit="bool"))
        base = lookup(dec, "tokens_per_s", family=BASELINE, L=256, batch=1)
        for f in LINEAR:
            mine = lookup(dec, "tokens_per_s", family=f, L=256, batch=1)
            out.append(target(f"decode {f}: tokens/s vs transformer_lm, L=256, batch 1", ratio(mine, base),
                              wanted_speedup(f, "decode_short")))
    for f in LINEAR:
        for (task, src_len), wanted in wanted_speedup(f, "seq2seq").items():
            if results.get(task) is not None:
                mine, base = (lookup(results[task], "sentences_per_s", family=x, src_len=src_len) for x in (f, BASELINE))
                out.append(target(f"{task} {f}: sentences/s vs transformer, source length {src_len}",
                                  ratio(mine, base), wanted))
    if results.get("beam") is not None:
        out += beam_targets(results["beam"])
    if results.get("train") is not None:
        for T in TRAIN_CONTEXTS:
            base = lookup(results["train"], "tokens_per_s", family=BASELINE, ctx=T)
            for f in LINEAR:
                mine = lookup(results["train"], "tokens_per_s", family=f, ctx=T)
                out.append(target(f"train {f}: tokens/s vs transformer_lm, context {T}", ratio(mine, base),
                                  wanted_speedup(f, "train").get(T, 1.0)))
    if results.get("local") is not None:
        out += local_targets(results["local"])
    return out


TRAIN_CONTEXTS = (2048, 8192)


def local_targets(recs):
    """Local precision's cost (issue: decoding within 15% of the family without it
    at L=4096, batch 16; the state constant in L)."""
    out = []
    for f in [f for f in families(recs) if not f.endswith("+local")]:
        mine, base = (lookup(recs, "tokens_per_s", family=x, L=4096, batch=16) for x in (f + "+local", f))
        out.append(target(f"local {f}: decode tokens/s with the window / without, L=4096, batch 16",
                          ratio(mine, base), 0.85))
        sizes = {r["L"]: r["state_bytes_per_seq"] for r in ok(recs) if r["family"] == f + "+local" and "L" in r}
        out.append(target(f"local {f}: state bytes per sequence with the window constant over L={sorted(sizes)}",
                          None if len(sizes) < 2 else float(len(set(sizes.values())) == 1), 1.0, unit="bool"))
    return out


def wanted_speedup(family: str, what: str):
    """A family's own speed-up targets (Family.targets): "decode_short" (decoding at
    L=256, batch 1; else 1.0x), "train" {context: x} (else 1.0x), "seq2seq"
    {(task, source length): x}."""
    default = 1.0 if what == "decode_short" else {}
    return family_list.get(family).targets.get(what, default)


def beam_targets(recs):
    """At the widest beam: each family (as its paper places it) twice softmax's
    sentences/s, with less peak memory."""
    widest = max((r["beam"] for r in recs), default=None)
    out = []
    for f in LINEAR:
        speed = ratio(*(lookup(recs, "sentences_per_s", family=x, beam=widest) for x in (f, BASELINE)))
        out.append(target(f"beam {f}: sentences/s vs transformer, beam {widest}", speed, 2.0))
        mem = [lookup(recs, "peak_mem_mib", family=x, beam=widest) for x in (f, BASELINE)]
        less = None if None in mem else float(mem[0] < mem[1])
        out.append(target(f"beam {f}: peak memory below transformer's, beam {widest}", less, 1.0, unit="bool"))
    return out


# -- tables ------------------------------------------------------------------------------
def cell(records, metric, fmt, **key):
    for r in records or []:
        if matches(r, key):
            return fmt.format(metric_value(r, metric)) if r["status"] == "ok" else "skipped"
    return ""


def table(records, rows, cols, metric, fmt, title):
    """rows: [(label, key dict)], cols: [(label, key dict)]"""
    lines = [f"**{title}**", "", "| | " + " | ".join(c for c, _ in cols) + " |",
             "|---|" + "---:|" * len(cols)]
    for label, rkey in rows:
        lines.append(f"| {label} | " + " | ".join(cell(records, metric, fmt, **rkey, **ckey) for _, ckey in cols) + " |")
    return "\n".join(lines) + "\n"


def families(records):
    seen = []
    for r in records:
        if r["family"] not in seen:
            seen.append(r["family"])
    return seen


def arch_label(records, family):
    r = next(r for r in records if r["family"] == family)
    label = r["arch"] + (" (SDPA)" if family.endswith("_sdpa") else "")
    label += " (recommended roles)" if r.get("placement") == "recommended" else ""
    return f"{label}, {r['params'] / 1e6:.2f}M"


def decode_tables(dec):
    lengths = sorted({r["L"] for r in dec})
    cols = [(f"L={L}", {"L": L}) for L in lengths]
    rows = [(f"{arch_label(dec, f)}, batch {B}", {"family": f, "batch": B})
            for B in sorted({r["batch"] for r in dec}) for f in families(dec)]
    return [
        table(dec, rows, cols, "tokens_per_s", "{:,.0f}", "Decoding: generated tokens/s (median)"),
        table(dec, rows, cols, "step_ms_end", "{:.2f}", "Decoding: ms per step over the last 32 steps"),
        table(dec, rows, cols, "state_bytes_per_seq", "{:,.0f}", "Decoding: incremental-state bytes per sequence at the end"),
        table(dec, rows, cols, "peak_mem_mib", "{:,.0f}", "Decoding: peak memory above the model's (MiB)"),
    ]


def hybrid_tables(recs):
    cols = [(f"L={L}", {"L": L}) for L in sorted({r["L"] for r in recs})]
    rows = [(arch_label(recs, f), {"family": f}) for f in families(recs)]
    layers = f"decoder layer(s) {recs[0]['softmax_layers']} softmax, the others linear; batch 1"
    return [
        table(recs, rows, cols, "tokens_per_s", "{:,.0f}", f"Hybrid stacks: generated tokens/s ({layers})"),
        table(recs, rows, cols, "linear_state_bytes", "{:,.0f}", "Hybrid stacks: the linear layers' state (bytes)"),
        table(recs, rows, cols, "softmax_cache_bytes", "{:,.0f}", "Hybrid stacks: the softmax layers' cache (bytes)"),
    ]


# suite: (title, the column axis, its label, what every row measured)
SEQ2SEQ = {
    "mt": ("Translation", "src_len", "S={}", "beam {beam}, {sentences} sentences, target length = source length S"),
    "sum": ("Summarization", "src_len", "S={}", "beam {beam}, {sentences} sources of S tokens, {tgt_len} target tokens"),
    "beam": ("Beam width", "beam", "beam {}", "{sentences} sources of {src_len} tokens, {tgt_len} target tokens"),
}


def seq2seq_tables(suite, recs):
    title, axis, label, where = SEQ2SEQ[suite]
    cols = [(label.format(x), {axis: x}) for x in sorted({r[axis] for r in recs})]
    rows = [(arch_label(recs, f), {"family": f}) for f in families(recs)]
    tables = [table(recs, rows, cols, "sentences_per_s", "{:.3f}", f"{title}: sentences/s ({where.format(**recs[0])})")]
    if all("state_bytes_per_hyp" in r for r in ok(recs)):
        tables.append(table(recs, rows, cols, "state_bytes_per_hyp", "{:,.0f}",
                            f"{title}: incremental-state bytes per hypothesis at the end (source cache included)"))
    return tables + [table(recs, rows, cols, "peak_mem_mib", "{:,.0f}", f"{title}: peak memory (MiB)")]


def train_tables(recs):
    cols = [(f"ctx={T}", {"ctx": T}) for T in sorted({r["ctx"] for r in recs})]
    rows = [(arch_label(recs, f), {"family": f}) for f in families(recs)]
    return [
        table(recs, rows, cols, "tokens_per_s", "{:,.0f}", "Training: tokens/s, forward + backward (median)"),
        table(recs, rows, cols, "peak_mem_mib", "{:,.0f}", "Training: peak memory of a step (MiB)"),
    ]


def local_tables(recs):
    """The local suite: its decoding records (L, batch) and its training records (ctx)."""
    label = lambda f: arch_label(recs, f) + (" + window" if f.endswith("+local") else "")  # noqa: E731
    dec, tr = [r for r in recs if "L" in r], [r for r in recs if "ctx" in r]
    cols = [(f"L={L}, batch {B}", {"L": L, "batch": B}) for B in sorted({r["batch"] for r in dec})
            for L in sorted({r["L"] for r in dec})]
    rows = [(label(f), {"family": f}) for f in families(recs)]
    ctx = [(f"ctx={T}", {"ctx": T}) for T in sorted({r["ctx"] for r in tr})]
    what = "each family that offers it, without and with `" + " ".join(LOCAL) + "`"
    return [
        table(dec, rows, cols, "tokens_per_s", "{:,.0f}", f"Local precision: decoding tokens/s ({what})"),
        table(dec, rows, cols, "state_bytes_per_seq", "{:,.0f}", "Local precision: decoding state bytes per sequence"),
        table(tr, rows, ctx, "tokens_per_s", "{:,.0f}", "Local precision: training tokens/s, forward + backward"),
    ]


def target_table(ts):
    lines = ["**Targets**", "", "| target | measured | wanted | met |", "|---|---:|---:|:---:|"]
    for t in ts:
        if t["value"] is None:
            value, met = "not measured", ""
        elif t["unit"] == "bool":
            value, met = ("yes" if t["value"] else "no"), ("yes" if t["met"] else "**no**")
        else:
            value, met = f"{t['value']:.2f}x", "yes" if t["met"] else "**no**"
        wanted = "yes" if t["unit"] == "bool" else f">= {t['threshold']}x"
        lines.append(f"| {t['name']} | {value} | {wanted} | {met} |")
    return "\n".join(lines) + "\n"


def skips(results):
    lines = []
    for suite in TABLES:
        for r in results.get(suite) or []:
            if r["status"] != "ok":
                size = {k: r[k] for k in ("L", "batch", "src_len", "beam", "ctx") if k in r}
                lines.append(f"- {suite} {r['family']} {size}: {r['reason']}")
    return lines


FREED_MEMORY = {"kept": " Training steps timed with freed memory kept for reuse (`--freed-memory kept`).",
                "default": " Training steps timed with the allocator as it is (`--freed-memory default`)."}


def markdown(results, plots=()):
    m = results["machine"]
    head = [
        f"Measured {results['created']} with `{results['command']}`" + (" (quick sizes)" if results["quick"] else "")
        + "".join(f"; {', '.join(e['suites'])} measured {e['created']} with `{e['command']}`"
                  for e in results.get("earlier", [])),
        f"on {m['cpu']} ({m['cpu_count']} CPUs, {m['memory_gib']} GiB"
        + (f", GPU {m['gpu']}" if m.get("gpu") else "") + f"), device {m['device']}, {m['threads']} torch threads"
        + (f" pinned to {m['cpus_usable']} of the CPUs" if m.get("cpus_usable", m["cpu_count"]) < m["cpu_count"] else "") + ";",
        f"torch {m['torch']}, fairseq {m['fairseq']}, Python {m['python']}. Untrained models, greedy decoding for LMs."
        + (FREED_MEMORY[results.get("freed_memory", "default")] + f" Training in {results.get('dtype', 'float32')}."
           if set(results) & {"train", "local"} else ""),
        "",
    ]
    parts = ["\n".join(head)]
    for suite, tables in TABLES.items():
        if results.get(suite):
            parts += tables(results[suite])
    parts.append(target_table(results["targets"]))
    skipped = skips(results)
    if skipped:
        parts.append("Not measured (the run would exceed the time budget):\n\n" + "\n".join(skipped) + "\n")
    parts += [f"![{Path(p).stem}]({p})\n" for p in plots]
    return "\n".join(parts)


TABLES = {"decode": decode_tables, "hybrid": hybrid_tables, **{suite: partial(seq2seq_tables, suite) for suite in SEQ2SEQ},
          "train": train_tables, "local": local_tables}


def profile_table(records) -> str:
    """benchmarks.profile_train's records, a row each."""
    lines = ["| row | dtype | step ms (profiled) | launches | the operators taking the most time (share) |",
             "|---|---|---:|---:|---|"]
    for r in records:
        ops = ", ".join(f"{o['op'].removeprefix('aten::')} x{o['calls']} {o['share']:.0%}" for o in r["top"])
        lines.append(f"| {r['family']} ({r['params'] / 1e6:.2f}M, ctx {r['ctx']}, batch {r['batch']}) | {r['dtype']} "
                     f"| {r['step_ms']:.1f} | {r['launches']} | {ops} |")
    return "\n".join(lines)


def update_readme(readme: Path, tables: str, out: Path, begin: str = BEGIN, end: str = END):
    """Replace the block between the markers with `tables`, plots linked relative to the README."""
    text = readme.read_text()
    if begin not in text or end not in text:
        raise SystemExit(f"{readme}: no {begin} ... {end} block to replace")
    rel = os.path.relpath(out, readme.parent)
    tables = tables.replace("](", f"]({rel}/")
    start, stop = text.index(begin) + len(begin), text.index(end)
    readme.write_text(text[:start] + "\n" + tables + text[stop:])


# -- plots ------------------------------------------------------------------------------------
def _series(records, x, y, **key):
    pts = sorted((r[x], metric_value(r, y)) for r in ok(records) if matches(r, key))
    return [p[0] for p in pts], [p[1] for p in pts]


def _panel(ax, records, x, y, title, ylabel, logy=True, **key):
    for f in families(records):
        xs, ys = _series(records, x, y, family=f, **key)
        if xs:
            ax.plot(xs, ys, marker="o", label=f)
    ax.set_xscale("log", base=2)
    if logy:
        ax.set_yscale("log")
    ax.set_title(title, fontsize=9)
    ax.set_xlabel(x)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def plots(results, out: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    where = f"{results['machine']['cpu']}, {results['machine']['device']}, {results['machine']['threads']} threads"
    written = []

    def figure(name, panels):
        cols = 2
        rows = -(-len(panels) // cols)
        fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.6 * rows), squeeze=False)
        for ax, (records, x, y, title, ylabel, key) in zip(axes.flat, panels):
            _panel(ax, records, x, y, title, ylabel, **key)
        fig.suptitle(where, fontsize=8)
        fig.tight_layout()
        path = out / f"{name}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    dec = results.get("decode")
    if dec:
        B = max(r["batch"] for r in dec)
        figure("decode", [
            (dec, "L", "tokens_per_s", "tokens/s, batch 1", "tokens/s", {"batch": 1}),
            (dec, "L", "tokens_per_s", f"tokens/s, batch {B}", "tokens/s", {"batch": B}),
            (dec, "L", "step_ms_end", f"ms per step at the end, batch {B}", "ms", {"batch": B}),
            (dec, "L", "state_bytes_per_seq", "incremental state per sequence", "bytes", {"batch": B}),
        ])
    if results.get("mt"):
        figure("mt", [
            (results["mt"], "src_len", "sentences_per_s", "beam search, target length = source", "sentences/s", {}),
            (results["mt"], "src_len", "peak_mem_mib", "peak memory", "MiB", {}),
        ])
    if results.get("hybrid"):
        figure("hybrid", [
            (results["hybrid"], "L", "linear_state_bytes", "linear layers' state", "bytes", {}),
            (results["hybrid"], "L", "softmax_cache_bytes", "softmax layers' cache", "bytes", {}),
        ])
    if results.get("sum"):
        figure("sum", [
            (results["sum"], "src_len", "sentences_per_s", "beam search, short outputs", "sentences/s", {}),
            (results["sum"], "src_len", "state_bytes_per_hyp", "state per hypothesis", "bytes", {}),
        ])
    if results.get("beam"):
        figure("beam", [
            (results["beam"], "beam", "sentences_per_s", "beam search by width", "sentences/s", {}),
            (results["beam"], "beam", "peak_mem_mib", "peak memory", "MiB", {}),
        ])
    if results.get("train"):
        figure("train", [
            (results["train"], "ctx", "tokens_per_s", "forward + backward", "tokens/s", {}),
            (results["train"], "ctx", "peak_mem_mib", "peak memory", "MiB", {}),
        ])
    return written
