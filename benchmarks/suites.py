"""The three suites. Each returns a list of records (one per family and size),
measured through the code paths a fairseq user runs: SequenceGenerator with
incremental state for decoding, the model's forward and backward for training.

A size whose run is projected (from the smaller sizes already measured) to
take longer than the budget is recorded as skipped, with the projection."""
import time
import types

import torch
import torch.nn.functional as F
from torch import Tensor
from fairseq.sequence_generator import SequenceGenerator

from linear_fairseq import families as family_records
from linear_fairseq.modules.attention import option_names

from . import models
from .measure import PeakMemory, freed_memory, projected_seconds, softmax_cache_bytes, state_bytes, summary, sync

EDGE = 32  # steps averaged for the latency at the start and at the end


def skipped(record, projected, budget):
    record.update(status="skipped", reason=f"projected {projected:.0f} s > budget {budget:.0f} s")
    return record


def more_runs(first_seconds, budget, repeats) -> int:
    """How many runs may follow a first one: up to repeats - 1, while all of them
    fit in a tenth of the budget; long runs are measured once (their per-step
    times still show the spread within the run)."""
    return max(0, min(repeats - 1, int(budget / 10 / max(first_seconds, 1e-9)) - 1))


def repeated(run, first_seconds, budget, repeats):
    """more_runs() more runs of `run` (each returning a measurement)."""
    return [run() for _ in range(more_runs(first_seconds, budget, repeats))]


# -- decode ---------------------------------------------------------------------
def timed_generation(model, d, L, B, device, beam=1, src_tokens=None):
    """Generate exactly L tokens per sentence (plus eos). Returns seconds, the
    per-step intervals (s), the incremental state at the last step, peak memory."""
    gen = SequenceGenerator([model], d, beam_size=beam, max_len_a=0, max_len_b=L, min_len=L)
    stamps, last = [], {}
    forward_decoder = gen.model.forward_decoder

    def timed_forward_decoder(tokens, encoder_outs, incremental_states, temperature=1.0):
        sync(device)
        stamps.append(time.perf_counter())
        last["state"] = incremental_states
        return forward_decoder(tokens, encoder_outs, incremental_states, temperature)

    gen.model.forward_decoder = timed_forward_decoder
    if src_tokens is None:  # a language model continues one token
        src_tokens = torch.full((B, 1), d.nspecial, dtype=torch.long, device=device)
    lengths = src_tokens.ne(d.pad()).sum(1)
    sample = {"net_input": {"src_tokens": src_tokens, "src_lengths": lengths}}
    with torch.no_grad(), PeakMemory(device) as mem:
        sync(device)
        start = time.perf_counter()
        hypos = gen.generate([model], sample)
        sync(device)
        seconds = time.perf_counter() - start
    produced = {len(h[0]["tokens"]) for h in hypos}
    if produced != {L + 1}:
        raise RuntimeError(f"asked for {L} tokens + eos, generated lengths {sorted(produced)}")
    steps = [b - a for a, b in zip(stamps, stamps[1:])]
    return seconds, steps, last["state"], mem.mib


def median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2] if xs else None


def decode(lengths, batches, device, budget, repeats, families=models.FAMILIES, log=print, extra=None):
    """LM generation at each length and batch; `extra`: row -> (family, flags), the
    rows measured instead of the families as they are. The rows take turns at
    each size (every row's first run, then their repeats in the same order), so
    the rows a ratio compares are timed side by side, not minutes apart."""
    built = {}
    for row, (family, flags) in (extra or {f: (f, ()) for f in families}).items():
        built[row] = models.build("lm", family, device, extra=list(flags))
        timed_generation(*built[row][:2], 16, max(batches), device)  # warm-up
    records, history = [], {}
    for B in batches:
        for L in lengths:
            runs = {}
            for row, (model, d, info) in built.items():
                rec = {"family": row, "arch": info["arch"], "params": info["params"], "L": L, "batch": B}
                projected = projected_seconds(history.setdefault((row, B), []), L)
                if projected > budget:
                    records.append(skipped(rec, projected, budget))
                    log(f"decode {row:<11} L={L:<6} B={B:<3} skipped: {rec['reason']}")
                    continue
                runs[row] = (rec, timed_generation(model, d, L, B, device))
                history[row, B].append((L, runs[row][1][0]))
            more = {row: more_runs(first[0], budget, repeats) for row, (_, first) in runs.items()}
            times = {row: [first[0]] for row, (_, first) in runs.items()}
            for i in range(max(more.values(), default=0)):
                for row in (row for row in runs if more[row] > i):
                    times[row].append(timed_generation(*built[row][:2], L, B, device)[0])
            for row, (rec, (_, steps, state, mem)) in runs.items():
                records.append(decode_record(rec, times[row], steps, state, mem))
                log(
                    f"decode {row:<11} L={L:<6} B={B:<3} {rec['tokens_per_s']['median']:8.0f} tok/s  "
                    f"step {rec['step_ms_start']:.2f}->{rec['step_ms_end']:.2f} ms  "
                    f"state {rec['state_bytes_per_seq'] / 1024:.0f} KiB/seq  peak {mem:.0f} MiB"
                )
    return records


def decode_record(rec, times, steps, state, mem):
    """rec with the runs' times (s), the first run's step intervals, state and peak memory."""
    L, B = rec["L"], rec["batch"]
    rec.update(
        status="ok",
        seconds=summary(times),
        tokens_per_s=summary([B * L / t for t in times]),
        step_ms_start=1000 * median(steps[1 : EDGE + 1]),
        step_ms_end=1000 * median(steps[-EDGE:]),
        state_bytes_per_seq=state_bytes(state) / B,
        peak_mem_mib=mem,
    )
    return rec


# -- hybrid stacks ---------------------------------------------------------------------------
def hybrid(lengths, softmax_layers, device, budget, repeats, families=models.FAMILIES[1:], log=print):
    """LM decoding at batch 1 with the decoder layers `softmax_layers` kept as
    fairseq's softmax attention (--decoder-softmax-layers): tokens/s, and the
    state split into the linear layers' (constant) and the softmax layers'
    cache (growing with the prefix)."""
    records = []
    for family in families:
        model, d, info = models.build("lm", family, device, extra=["--decoder-softmax-layers", softmax_layers])
        timed_generation(model, d, 16, 1, device)  # warm-up
        history = []
        for L in lengths:
            rec = {"family": family, "arch": info["arch"], "params": info["params"], "L": L, "batch": 1,
                   "softmax_layers": softmax_layers}
            projected = projected_seconds(history, L)
            if projected > budget:
                records.append(skipped(rec, projected, budget))
                log(f"hybrid {family:<11} L={L:<6} skipped: {rec['reason']}")
                continue
            seconds, _, state, _ = timed_generation(model, d, L, 1, device)
            more = repeated(lambda: timed_generation(model, d, L, 1, device)[0], seconds, budget, repeats)
            history.append((L, seconds))
            softmax = softmax_cache_bytes(state)
            rec.update(status="ok", seconds=summary([seconds, *more]),
                       tokens_per_s=summary([L / t for t in (seconds, *more)]),
                       softmax_cache_bytes=softmax, linear_state_bytes=state_bytes(state) - softmax)
            records.append(rec)
            log(f"hybrid {family:<11} L={L:<6} {rec['tokens_per_s']['median']:8.0f} tok/s  "
                f"linear {rec['linear_state_bytes'] / 1024:.0f} KiB, softmax cache {softmax / 1024:.0f} KiB")
    return records


# -- encoder-decoder: mt, sum, beam -----------------------------------------------------
def seq2seq_rows(placements=models.PLACEMENTS) -> dict:
    """Row name -> (family, placement): the softmax transformer, then each family
    as its paper places its attention (row <family>) and as recommended
    (row <family>-rec, see models.placement_args)."""
    rows = {models.FAMILIES[0]: (models.FAMILIES[0], "paper")}
    for family in models.FAMILIES[1:]:
        rows.update({family + ("" if where == "paper" else "-rec"): (family, where) for where in placements})
    return rows


def random_source(d, sentences, S, generator, device):
    """`sentences` sources of S random words, each ended by eos."""
    words = torch.randint(d.nspecial, len(d), (sentences, S), generator=generator)
    return torch.cat([words, torch.full((sentences, 1), d.eos())], 1).to(device)


def seq2seq(suite, axis, cells, sentences, device, budget, repeats, rows, log):
    """Beam search of random sources for each row of seq2seq_rows() and each cell
    (x, source length, target length, beam); x is the size the budget's
    projection extrapolates along (`axis` names it in the log)."""
    records, placements = [], seq2seq_rows()
    for row in rows:
        family, placement = placements[row]
        model, d, info = models.build("mt", family, device, placement=placement)
        g = torch.Generator().manual_seed(0)

        def source(S):
            return random_source(d, sentences, S, g, device)

        timed_generation(model, d, 8, sentences, device, 2, source(8))  # warm-up
        history = []
        for x, S, T, beam in cells:
            rec = {"family": row, "arch": info["arch"], "placement": placement, "args": info["args"],
                   "params": info["params"], "src_len": S, "tgt_len": T, "sentences": sentences, "beam": beam}
            projected = projected_seconds(history, x)
            if projected > budget:
                records.append(skipped(rec, projected, budget))
                log(f"{suite:<6} {row:<14} {axis}={x:<6} skipped: {rec['reason']}")
                continue
            src = source(S)
            seconds, _, state, mem = timed_generation(model, d, T, sentences, device, beam, src)
            state = state_bytes(state)
            more = repeated(lambda: timed_generation(model, d, T, sentences, device, beam, src)[0],
                            seconds, budget, repeats)
            history.append((x, seconds))
            times = [seconds, *more]
            rec.update(status="ok", seconds=summary(times), sentences_per_s=summary([sentences / t for t in times]),
                       state_bytes_per_hyp=state / (sentences * beam), peak_mem_mib=mem)
            records.append(rec)
            log(f"{suite:<6} {row:<14} {axis}={x:<6} {rec['sentences_per_s']['median']:8.3f} sent/s  "
                f"state {state / (sentences * beam) / 1024:.0f} KiB/hyp  peak {mem:.0f} MiB")
    return records


def mt(src_lengths, sentences, beam, device, budget, repeats, rows=tuple(seq2seq_rows(("paper",))), log=print):
    """Translation: as many target tokens as source tokens, over source lengths."""
    return seq2seq("mt", "S", [(S, S, S, beam) for S in src_lengths], sentences, device, budget, repeats, rows, log)


def summarization(src_lengths, tgt_len, sentences, beam, device, budget, repeats, rows=tuple(seq2seq_rows()), log=print):
    """Summarization: long sources, short outputs (`tgt_len` tokens)."""
    return seq2seq("sum", "S", [(S, S, tgt_len, beam) for S in src_lengths], sentences, device, budget, repeats,
                   rows, log)


def beam_width(beams, src_len, tgt_len, sentences, device, budget, repeats, rows=tuple(seq2seq_rows()), log=print):
    """Beam width: one source length, beams of growing width."""
    return seq2seq("beam", "beam", [(k, src_len, tgt_len, k) for k in beams], sentences, device, budget, repeats,
                   rows, log)


# -- train ------------------------------------------------------------------------
def sdpa_forward(self, query, key=None, value=None, key_padding_mask=None, incremental_state=None,
                 need_weights=False, attn_mask=None, **unused):
    """A fairseq MultiheadAttention's own weights, computed by torch's fused
    scaled_dot_product_attention (causal): the strongest softmax baseline."""
    T, B, D = query.shape
    H = self.num_heads
    q, k, v = (p(query).view(T, B, H, D // H).permute(1, 2, 0, 3) for p in (self.q_proj, self.k_proj, self.v_proj))
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return self.out_proj(out.permute(2, 0, 1, 3).reshape(T, B, D)), None


TRAIN_ROWS = {"transformer": "transformer", "transformer_sdpa": "transformer", **{f: f for f in models.FAMILIES}}


def measurements(suite: str, sizes: dict) -> int:
    """How many measurements (one log line each, skipped ones too) a suite makes with `sizes`."""
    cells = {"decode": lambda: len(models.FAMILIES) * len(sizes["batches"]) * len(sizes["lengths"]),
             "mt": lambda: len(seq2seq_rows(("paper",))) * len(sizes["src_lengths"]),
             "sum": lambda: len(seq2seq_rows()) * len(sizes["src_lengths"]),
             "beam": lambda: len(seq2seq_rows()) * len(sizes["beams"]),
             "hybrid": lambda: (len(models.FAMILIES) - 1) * len(sizes["lengths"]),
             "train": lambda: len(TRAIN_ROWS) * len(sizes["contexts"]),
             "local": lambda: len(local_rows()) * (len(sizes["batches"]) * len(sizes["lengths"])
                                                  + len(sizes["contexts"]))}
    return cells[suite]()


def train_model(row, device, family=None, flags=(), dtype=torch.float32):
    model, d, info = models.build("lm", family or TRAIN_ROWS[row], device, dtype, extra=list(flags))
    if row == "transformer_sdpa":
        for layer in model.decoder.layers:
            layer.self_attn.forward = types.MethodType(sdpa_forward, layer.self_attn)
        info = {**info, "attention": "torch scaled_dot_product_attention"}
    return model.train(), d, info


def train_pass(model, tokens) -> Tensor:
    """One forward and backward of the next-token loss over tokens (B, T + 1), the
    gradients set to None first, as fairseq's trainer leaves them between updates
    (so no step adds into an earlier step's gradients); returns the loss."""
    model.zero_grad(set_to_none=True)
    logits = model(tokens[:, :-1])[0]
    loss = F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten())
    loss.backward()
    return loss


def train_step(model, tokens, device):
    sync(device)
    start = time.perf_counter()
    loss = train_pass(model, tokens)
    sync(device)
    if not torch.isfinite(loss):
        raise RuntimeError(f"non-finite training loss {loss.item()}")
    return time.perf_counter() - start


def train(contexts, tokens_per_batch, device, budget, repeats, rows=tuple(TRAIN_ROWS), log=print, extra=None,
          freed_memory_mode="default", dtype=torch.float32):
    """Forward + backward of a language model over batches of `tokens_per_batch`
    tokens cut into sequences of each context length, weights and activations in
    `dtype`; `extra`: row -> (family, flags), the rows measured instead of `rows`.
    The steps are timed with the allocator's freed memory `freed_memory_mode`
    (measure.freed_memory), the peak memory in a step of its own."""
    records = []
    for row, (family, flags) in (extra or {r: (None, ()) for r in rows}).items():
        model, d, info = train_model(row, device, family, flags, dtype)
        g = torch.Generator().manual_seed(0)
        history = []
        for T in contexts:
            B = max(1, tokens_per_batch // T)
            rec = {"family": row, "arch": info["arch"], "params": info["params"], "ctx": T, "batch": B,
                   "dtype": str(next(model.parameters()).dtype).removeprefix("torch.")}
            projected = projected_seconds(history, T) * 3  # warm-up, one timed step, the memory's
            if projected > budget:
                records.append(skipped(rec, projected, budget))
                log(f"train  {row:<16} ctx={T:<6} skipped: {rec['reason']}")
                continue
            tokens = torch.randint(d.nspecial, len(d), (B, T + 1), generator=g).to(device)
            with freed_memory(freed_memory_mode) as rec["freed_memory"]:
                train_step(model, tokens, device)  # warm-up
                seconds = train_step(model, tokens, device)
                more = repeated(lambda: train_step(model, tokens, device), seconds, budget, repeats)
            with PeakMemory(device) as mem:  # untimed: the resident set's peak needs freed memory handed back
                train_step(model, tokens, device)
            history.append((T, seconds))
            times = [seconds, *more]
            rec.update(status="ok", seconds=summary(times),
                       tokens_per_s=summary([B * T / t for t in times]), peak_mem_mib=mem.mib)
            records.append(rec)
            log(f"train  {row:<16} ctx={T:<6} {rec['tokens_per_s']['median']:8.0f} tok/s  peak {mem.mib:.0f} MiB")
    return records


# -- local precision ----------------------------------------------------------------------------
LOCAL = ("--local-window", "16")  # the window of the recommended Austen configs


def local_rows() -> dict:
    """row -> (family, flags): each family that offers local precision, as it is and with LOCAL."""
    offered = [f for f in models.FAMILIES[1:] if "local_window" in option_names(family_records.get(f))]
    return {row: value for f in offered for row, value in ((f, (f, ())), (f"{f}+local", (f, LOCAL)))}


def local(lengths, batches, contexts, tokens_per_batch, device, budget, repeats, log=print,
          freed_memory_mode="default", dtype=torch.float32):
    """What local precision costs: LM decoding (tokens/s, state) and training
    (tokens/s) of each family that offers it, without and with LOCAL."""
    rows = local_rows()
    return (decode(lengths, batches, device, budget, repeats, log=log, extra=rows)
            + train(contexts, tokens_per_batch, device, budget, repeats, log=log, extra=rows,
                    freed_memory_mode=freed_memory_mode, dtype=dtype))


TRAINING = ("train", "local")  # the suites that time training steps (and take freed_memory_mode, dtype)
RUN = {"decode": decode, "hybrid": hybrid, "mt": mt, "sum": summarization, "beam": beam_width, "train": train,
       "local": local}  # --suite NAME
