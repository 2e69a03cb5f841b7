"""Beam search's reorder of the encoder output, done only where it is read.

fairseq's beam search calls ``reorder_encoder_out`` after every step, and
fairseq's encoder copies the source (T x C) for every hypothesis row each
time. A decoder reads the source only until each of its cross-attentions has
cached what it needs in the incremental state (a linear family's summary,
softmax's keys and values): from the second step on the copies go unread.

Here the reorder keeps the encoder's own tensors and composes the rows the
reorders picked; the big entries hold placeholders of the reordered shape on
the meta device, which have no data. The decoder gathers the rows where it
still reads the source: a full forward, a first step, an incremental state
that has not cached the source, --print-alignment (its weights need the keys
every step). The padding mask and the other small entries are reordered as
fairseq does.
"""
from typing import Dict, List

import torch
from torch import Tensor

EncoderOut = Dict[str, List[Tensor]]

ROWS = "lazy_source_rows"  # the encoder's rows each reordered row comes from
SOURCE = "lazy_source_of_"  # + key: the encoder's own tensor of that entry
GATHERED = {"encoder_out": 1, "encoder_embedding": 0}  # the entries moved lazily, by their batch dimension


def placeholder(t: Tensor, dim: int, rows: int) -> Tensor:
    """A tensor of t's shape with `rows` along `dim`, without data."""
    shape = list(t.shape)
    shape[dim] = rows
    return torch.empty(shape, dtype=t.dtype, device="meta")


def lazy_entries(encoder_out: EncoderOut, new_order: Tensor) -> EncoderOut:
    """The rows, sources and placeholders of `encoder_out` reordered by `new_order`."""
    rows = encoder_out[ROWS][0][new_order] if ROWS in encoder_out else new_order
    out = {ROWS: [rows]}
    for key, dim in GATHERED.items():
        if encoder_out.get(key):
            source = encoder_out.get(SOURCE + key, encoder_out[key])
            out[SOURCE + key] = source
            out[key] = [placeholder(source[0], dim, len(new_order))]
    return out


def eager_part(encoder_out: EncoderOut) -> EncoderOut:
    """`encoder_out` without the entries moved lazily, for fairseq's own reorder."""
    return {**encoder_out, **{key: [] for key in GATHERED if key in encoder_out}}


def gathered(encoder_out: EncoderOut) -> EncoderOut:
    """`encoder_out` with its lazily moved entries made real (unchanged where it has none)."""
    if ROWS not in encoder_out:
        return encoder_out
    rows = encoder_out[ROWS][0]
    real = {key: [encoder_out[SOURCE + key][0].index_select(dim, rows)]
            for key, dim in GATHERED.items() if SOURCE + key in encoder_out}
    return {key: value for key, value in {**encoder_out, **real}.items()
            if key != ROWS and not key.startswith(SOURCE)}


def source_needed(cross_attentions, incremental_state) -> bool:
    """Whether a decoder step reads the source: not every cross-attention has its
    cached state yet, or one returns alignment weights (computed from the keys)."""
    if incremental_state is None:
        return True
    return any(getattr(m, "alignment", False) or not m._get_input_buffer(incremental_state)
               for m in cross_attentions)
