"""scripts/chunk_offsets.py: a chunked model's loss by offset in its chunk
against a baseline's, from positions.py's JSON, and its one-line refusals."""
import json
import math
import sys

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "scripts"))
import chunk_offsets  # noqa: E402

G, CHUNKS, COUNT = 16, 3, 10


def losses(nll):
    return {"nll": nll, "count": [COUNT] * len(nll)}


def write(tmp_path, name, data):
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return str(path)


@pytest.fixture
def pair(tmp_path):
    """A baseline at 5 nats everywhere; the model 1 nat worse in the block's first
    chunk (which the comparison leaves out), and in the others equal at offset 0,
    0.1 better at offsets 1-7 and 0.2 better at 8-15."""
    base = [5.0] * (G * CHUNKS)
    later = [5.0] + [4.9] * 7 + [4.8] * 8
    model = [6.0] * G + later * (CHUNKS - 1)
    return write(tmp_path, "model.json", losses(model)), write(tmp_path, "base.json", losses(base))


def test_offsets_and_the_bound(pair, capsys):
    chunk_offsets.main([*pair, "--chunk", str(G)])
    out = capsys.readouterr().out
    lead = lambda nats: f"{100 * (math.exp(nats) - 1):+.1f}%"  # noqa: E731
    assert f"| 0 | +0.0% |" in out and f"| 1 | {lead(-0.1)} |" in out and f"| 2-3 | {lead(-0.1)} |" in out
    assert f"| 4-7 | {lead(-0.1)} |" in out and f"| 8-15 | {lead(-0.2)} |" in out
    # the head's excess over the rest's lead: 0.2 at offset 0 and 0.1 at 1-7, in two chunks
    mean = (6.0 * G + 2 * (5.0 + 7 * 4.9 + 8 * 4.8)) / (G * CHUNKS)
    excess = 2 * (0.2 + 7 * 0.1) / (G * CHUNKS)
    assert f"perplexity {math.exp(mean):.2f}; with the head's lead like the rest's {math.exp(mean - excess):.2f}" in out


@pytest.mark.parametrize("args,message", [
    (["model.json"], "1 files: give them in pairs"),
    (["model.json", "missing.json"], "missing.json: not a positions.py output"),
    (["model.json", "short.json"], "were not scored on the same blocks"),
    (["model.json", "base.json", "--chunk", "32"], "--chunk 32: ", ),
    (["model.json", "base.json", "--chunk", "0"], "--chunk 0: must be a positive number of tokens"),
])
def test_bad_input_is_one_line(pair, tmp_path, capsys, args, message):
    write(tmp_path, "short.json", losses([5.0] * G))
    with pytest.raises(SystemExit) as stop:
        chunk_offsets.main([str(tmp_path / a) if a.endswith(".json") else a for a in args])
    said = capsys.readouterr().err + str(stop.value.code if not isinstance(stop.value.code, int) else "")
    assert stop.value.code != 0 and message in said and "Traceback" not in said
