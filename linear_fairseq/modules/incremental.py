"""fairseq's incremental-state contract, shared by every module that decodes
step by step (a family's attention, FLASH's gated attention unit).

A module owns one buffer in fairseq's ``incremental_state``: a dict of tensors
whose first dimension is the batch, its size bounded whatever the prefix
length (FLASH-Quad and softmax-like caches excepted; on the CPU FLASH's chunk
buffers fill up to their G slots and it adds its sum when a chunk completes,
then its state stays). ``reorder_incremental_state``
index-selects every entry along the batch (``reorder_state``), which is all
that beam search needs. Without autograd the rows move into tensors a state
held before its reorder (the decoder's spares, kept in ``incremental_state``
beside the buffers: one layer's worth, which the next layer's reorder takes
and then leaves its own) rather than into new ones: on the CPU a new tensor
of a few MB is faulted in page by page, which costs the copy several times
over. A class using the mixin is decorated with fairseq's
``with_incremental_state`` and implements ``step(x_t, state, padding_mask_t)
-> (out_t, state)`` on batch-first tensors.
"""
from typing import Dict, Optional, Tuple

import torch
from torch import Tensor

from ..ops.common import rows_into

State = Dict[str, Optional[Tensor]]


class IncrementalState:
    encoder_decoder_attention = False  # a cross-attention's state is a summary of the source

    def step(self, x: Tensor, state: State, padding_mask: Optional[Tensor]) -> Tuple[Tensor, State]:
        raise NotImplementedError

    def decode_step(self, x: Tensor, state: State, padding_mask: Optional[Tensor]) -> Tuple[Tensor, State]:
        """What decoding runs each step: `step`, unless a subclass adds to it."""
        return self.step(x, state, padding_mask)

    def _decode(self, x: Tensor, padding_mask: Optional[Tensor], incremental_state) -> Tensor:
        """Step through x (T, B, C), time-major as fairseq's layers pass it, from the
        stored state, then store the new one; returns (T, B, C'). fairseq feeds one
        token per step; longer inputs are stepped through."""
        state = self._get_input_buffer(incremental_state)
        T = x.size(0)
        if padding_mask is not None:
            padding_mask = padding_mask[:, -T:]
        outs = []
        for t in range(T):
            mask_t = None if padding_mask is None else padding_mask[:, t]
            out_t, state = self.decode_step(x[t], state, mask_t)
            outs.append(out_t)
        self._set_input_buffer(incremental_state, state)
        return outs[0].unsqueeze(0) if T == 1 else torch.stack(outs)

    # -- the buffer (as in fairseq's MultiheadAttention) --------------------
    def _get_input_buffer(self, incremental_state) -> State:
        result = self.get_incremental_state(incremental_state, "attn_state")
        return result if result is not None else {}

    def _set_input_buffer(self, incremental_state, buffer: State):
        return self.set_incremental_state(incremental_state, "attn_state", buffer)

    @torch.jit.export
    def reorder_incremental_state(self, incremental_state, new_order: Tensor):
        """Follow beam search: reorder every state tensor along the batch dimension.
        fairseq reorders after every step, greedy search included; the decoder
        skips an order that keeps every row in place for all its modules at once
        (keeps_rows), so a step can keep writing into the state it owns. A
        cross-attention state is reordered only when the batch shrinks (a
        sentence finished): until then beam search moves rows within a sentence,
        whose rows all hold the same summary of its source (as fairseq's
        MultiheadAttention skips its static key/value cache)."""
        buffer = self._get_input_buffer(incremental_state)
        if buffer and self.encoder_decoder_attention:
            if batch_size(buffer) == new_order.numel():
                return incremental_state
            return self._set_input_buffer(incremental_state, select_rows(buffer, new_order))
        if buffer:
            spares = incremental_state.setdefault(SPARES, {})
            moved = self.reorder_state(buffer, new_order, spares)
            incremental_state = self._set_input_buffer(incremental_state, moved)
            incremental_state[SPARES] = recycled(spares, buffer, moved)
        return incremental_state

    def reorder_state(self, state: State, new_order: Tensor, spare: Optional[State] = None) -> State:
        """The state's rows in `new_order`, written into `spare`'s tensors where they
        fit (select_rows); a module whose state has slots it never reads overrides
        this to move less."""
        return select_rows(state, new_order, spare)


SPARES = "linear_fairseq.spares"  # the decoder's spare tensors in fairseq's incremental_state, by state name


def select_rows(state: State, rows: Tensor, spare: Optional[State] = None) -> State:
    """Every state tensor's rows `rows` (batch dimension first), each written into the
    first rows of spare[name] where that fits it (same dtype, device and trailing shape,
    at least as many rows, contiguous) and autograd does not follow the state."""
    spare = spare or {}
    return {name: None if value is None else rows_into(value, rows, spare.get(name))
            for name, value in state.items()}


def recycled(spares: State, old: State, new: State) -> State:
    """The spares after a reorder from state `old` to `new`: old's tensors, and the spares
    it left, but for any whose memory a tensor of new uses (not free to be written over)."""
    used = {memory(t) for t in new.values() if t is not None}
    return {name: t for name, t in {**spares, **old}.items() if t is not None and memory(t) not in used}


def memory(t: Tensor) -> int:
    return t.untyped_storage().data_ptr()


def batch_size(state: State) -> int:
    return next(v.shape[0] for v in state.values() if v is not None)


def keeps_rows(incremental_state, new_order: Tensor) -> bool:
    """Whether `new_order` is 0..B-1 over the states in fairseq's `incremental_state`,
    all of batch size B: beam search's order in greedy or sampled decoding while no
    row has finished. One value is read back to the host (on a GPU, one wait for
    the device), asked once for a decoder's whole stack."""
    sizes = {t.shape[0] for key, buffer in incremental_state.items()
             if isinstance(buffer, dict) and key != SPARES
             for t in buffer.values() if isinstance(t, Tensor)}
    n = new_order.numel()
    return sizes == {n} and bool((new_order == torch.arange(n, device=new_order.device)).all())
