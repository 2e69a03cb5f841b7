#!/usr/bin/env python
"""A chunked model's loss by a token's offset in its chunk, against a baseline's.

  python scripts/chunk_offsets.py MODEL.json BASELINE.json [MODEL.json BASELINE.json ...] [--chunk 64]

Each pair (one seed, say) is scripts/positions.py's output (mean NLL and token
count at each position of a block; `--by-position` leaves it beside each
checkpoint as positions-valid.json) for a model that attends exactly within
chunks of --chunk tokens and linearly to the chunks before (FLASH), and for a
baseline scored on the same blocks. A token at a chunk's first offsets sees
the tokens just before it through the linear part alone; this prints, per
pair, the model's perplexity against the baseline's at each span of offsets,
over every chunk of a block but its first (which has no chunk before it),
and what the whole set's perplexity would be if the first HEAD offsets had
the lead of the offsets after them: the most that attention across chunk
boundaries could gain.
"""
import argparse
import json
import math
import sys
from pathlib import Path

HEAD = 8  # offsets 0..HEAD-1 are the chunk's head; the lead of the rest is the reference


def spans(chunk: int) -> list:
    """Offset spans 0, 1, 2-3, 4-7, ... up to HEAD - 1, then HEAD..chunk-1."""
    out, a = [(0, 0)], 1
    while a < min(HEAD, chunk):
        out.append((a, min(2 * a, HEAD, chunk) - 1))
        a *= 2
    return out + ([(HEAD, chunk - 1)] if chunk > HEAD else [])


def load(path: str) -> dict:
    try:
        losses = json.loads(Path(path).read_text())
        assert len(losses["nll"]) == len(losses["count"]) > 0
    except (OSError, ValueError, KeyError, TypeError, AssertionError):
        sys.exit(f"[chunk_offsets] {path}: not a positions.py output (JSON with 'nll' and 'count' lists)")
    return losses


def gap(model: dict, base: dict, positions) -> float:
    """The model's mean NLL minus the baseline's over `positions`, token-weighted."""
    count = sum(model["count"][t] for t in positions)
    return sum((model["nll"][t] - base["nll"][t]) * model["count"][t] for t in positions) / count


def compare(model: dict, base: dict, chunk: int) -> dict:
    """{"spans": {(a, b): ppl ratio - 1}, "ppl": the model's, "bound": its ppl with a head like the rest}"""
    later = range(1, len(model["nll"]) // chunk)  # the chunks that have one before them
    at = lambda a, b: [k * chunk + o for k in later for o in range(a, b + 1)]  # noqa: E731
    ratios = {(a, b): math.exp(gap(model, base, at(a, b))) - 1 for a, b in spans(chunk)}
    total = sum(model["count"])
    nll = sum(n * c for n, c in zip(model["nll"], model["count"])) / total
    if chunk <= HEAD:
        return {"spans": ratios, "ppl": math.exp(nll), "bound": math.exp(nll)}
    rest = gap(model, base, at(HEAD, chunk - 1))
    excess = sum(max(0.0, model["nll"][t] - base["nll"][t] - rest) * model["count"][t] for t in at(0, HEAD - 1))
    return {"spans": ratios, "ppl": math.exp(nll), "bound": math.exp(nll - excess / total)}


def table(results: list) -> str:
    pairs = range(1, len(results) + 1)
    lines = ["| offset in chunk | " + " | ".join(f"pair {i}" for i in pairs) + " |",
             "| --- |" + " --- |" * len(results)]
    for a, b in results[0]["spans"]:
        cells = [f"{100 * r['spans'][(a, b)]:+.1f}%" for r in results]
        lines.append(f"| {a if a == b else f'{a}-{b}'} | " + " | ".join(cells) + " |")
    lines += [f"pair {i}: perplexity {r['ppl']:.2f}; with the head's lead like the rest's {r['bound']:.2f} "
              f"({100 * (r['bound'] / r['ppl'] - 1):+.2f}%)" for i, r in zip(pairs, results)]
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="+", metavar="JSON", help="MODEL.json BASELINE.json, one pair or more")
    ap.add_argument("--chunk", type=int, default=64, help="the model's chunk size G (default 64)")
    args = ap.parse_args(argv)
    if len(args.files) % 2:
        ap.error(f"{len(args.files)} files: give them in pairs, MODEL.json BASELINE.json")
    if args.chunk < 1:
        ap.error(f"--chunk {args.chunk}: must be a positive number of tokens")
    pairs = [(load(m), load(b)) for m, b in zip(args.files[::2], args.files[1::2])]
    for (m, b), path in zip(pairs, args.files[::2]):
        if m["count"] != b["count"]:
            ap.error(f"{path} and its baseline were not scored on the same blocks (their counts differ)")
        if len(m["nll"]) < 2 * args.chunk:
            ap.error(f"--chunk {args.chunk}: {path} has {len(m['nll'])} positions, fewer than two chunks")
    print(table([compare(m, b, args.chunk) for m, b in pairs]))


if __name__ == "__main__":
    main()
