"""Every family's models through fairseq's decoding machinery: incremental
decoding equals one full forward, beam reordering keeps it so, the decode
state does not grow with the prefix, and beam search scores equal forced
decoding."""
import pytest
import torch
from fairseq.sequence_generator import SequenceGenerator

from conftest import TINY_LM, TINY_MT, make_model, random_tokens
from linear_fairseq import families
from linear_fairseq.models import lazy_source
from linear_fairseq.modules.attention import LinearAttention
from linear_fairseq.modules.incremental import SPARES, IncrementalState, keeps_rows, memory

ATOL = 1e-4
TINY = {"mt": TINY_MT, "lm": TINY_LM}
TASK = {"mt": "translation", "lm": "language_modeling"}
HYBRID_LAYER = {"mt": 0, "lm": 1}  # hybrid stacks: this decoder layer stays fairseq's softmax layer


def family_cases():
    """(arch, args, task) for each registered family's models, each option set
    that changes its decoding path (Family.variants), and a hybrid stack of each
    model; the cases whose state grows with the prefix; the hybrid cases."""
    cases, growing, hybrid = {}, set(), {}
    for family in families.FAMILIES.values():
        for kind in ("mt", "lm"):
            cases[f"{family.name}_{kind}"] = (family.model(kind), TINY[kind] + list(family.tiny), TASK[kind])
            flags = ["--decoder-softmax-layers", str(HYBRID_LAYER[kind])]
            cases[f"{family.name}_{kind}_hybrid"] = (family.model(kind), TINY[kind] + list(family.tiny) + flags,
                                                     TASK[kind])
            hybrid[f"{family.name}_{kind}_hybrid"] = {HYBRID_LAYER[kind]}
        for name, variant in family.variants.items():
            kind = variant.kind
            cases[f"{family.name}_{name}"] = (family.model(kind), TINY[kind] + list(family.tiny) + list(variant.flags),
                                              TASK[kind])
            if variant.growing_state:
                growing.add(f"{family.name}_{name}")
    return cases, growing | set(hybrid), hybrid


CASES, GROWING_STATE, HYBRID = family_cases()  # FLASH-Quad and softmax layers keep every key
ENC_DEC = [case for case, (_, _, task) in CASES.items() if task == "translation"]


def left_padded_source(d, lengths, seed=0):
    """fairseq's source layout: pads on the left, eos last."""
    T = max(lengths)
    src = torch.full((len(lengths), T), d.pad())
    tokens = random_tokens(d, len(lengths), T, seed)
    for i, n in enumerate(lengths):
        src[i, T - n :] = tokens[i, :n]
        src[i, -1] = d.eos()
    return src, torch.tensor(lengths)


class Harness:
    """Runs one model's decoder, full or step by step, on a fixed batch."""

    def __init__(self, case, B=4, seed=0):
        arch, args, task = CASES[case]
        self.model, self.d = make_model(arch, args, task, seed=seed)
        # at init a GAU's gamma is ~N(0, 0.02) and a short convolution is the identity: their
        # outputs hardly depend on context, which would hide state bugs; give them unit scale
        g = torch.Generator().manual_seed(seed)
        for name, p in self.model.named_parameters():
            if name.endswith(("offset_scale.gamma", "offset_scale.beta", "rel_bias", "short_conv.weight")):
                p.data.normal_(0.0, 1.0, generator=g)
        self.encoder_out = None
        if hasattr(self.model, "encoder"):
            src, lengths = left_padded_source(self.d, [9, 5, 12, 3][:B], seed)
            self.src, self.src_lengths = src, lengths
            self.encoder_out = self.model.encoder(src, src_lengths=lengths)

    def full(self, prev, encoder_out=None):
        return self.model.decoder(prev, encoder_out=encoder_out or self.encoder_out)[0]

    def steps(self, prev, state, start=0, encoder_out=None):
        outs = []
        for t in range(start, prev.size(1)):
            out = self.model.decoder(
                prev[:, : t + 1], encoder_out=encoder_out or self.encoder_out, incremental_state=state
            )[0]
            outs.append(out)
        return torch.cat(outs, dim=1)


def decoder_input(d, B, T, seed=1):
    prev = random_tokens(d, B, T, seed)
    prev[:, 0] = d.eos()
    return prev


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("T", [1, 7, 70])
def test_incremental_decoding_equals_full_forward(case, T):
    h = Harness(case)
    prev = decoder_input(h.d, 4, T)
    with torch.no_grad():
        full = h.full(prev)
        inc = h.steps(prev, {})
    assert inc.shape == full.shape
    torch.testing.assert_close(inc, full, atol=ATOL, rtol=1e-4)


@pytest.mark.parametrize("case", list(CASES))
# beam search moves rows within a sentence, with repeats (0->1, 1->1, 2->0, ...), or
# drops the rows of a finished sentence (here sentence 0: the batch shrinks to 3 rows)
@pytest.mark.parametrize("new_order", [[1, 1, 0, 5, 3, 3], [5, 3, 3]], ids=["within-sentences", "sentence-done"])
def test_reorder_mid_sequence_follows_the_beams(case, new_order):
    beam, t0, T = 3, 6, 15
    h = Harness(case, B=2)
    if h.encoder_out is not None:  # 2 sentences x 3 beams, each beam sees its sentence's source
        rows = torch.arange(2).repeat_interleave(beam)
        h.encoder_out = h.model.encoder.reorder_encoder_out(h.encoder_out, rows)
    prev = decoder_input(h.d, 2 * beam, T)
    new_order = torch.tensor(new_order)
    with torch.no_grad():
        state = {}
        h.steps(prev[:, :t0], state)
        h.model.decoder.reorder_incremental_state_scripting(state, new_order)
        enc = h.encoder_out and h.model.encoder.reorder_encoder_out(h.encoder_out, new_order)
        # after the reorder row i continues the prefix of row new_order[i]
        seq = torch.cat([prev[new_order, :t0], prev[: len(new_order), t0:]], dim=1)
        inc = h.steps(seq, state, start=t0, encoder_out=enc)
        full = h.full(seq, encoder_out=enc)[:, t0:]
    torch.testing.assert_close(inc, full, atol=ATOL, rtol=1e-4)
    if len(new_order) < 2 * beam:
        return
    # and the reorder mattered: without it the outputs differ
    with torch.no_grad():
        state = {}
        h.steps(prev[:, :t0], state)
        stale = h.steps(seq, state, start=t0, encoder_out=enc)
    assert (stale - full).abs().max() > 1e-3


def live_and_spare_memory(state):
    """The memory the linear modules' states use, and that of the decoder's spares."""
    spares = state.get(SPARES, {})
    live = {memory(t) for key, buffer in state.items() if key != SPARES and isinstance(buffer, dict)
            for t in buffer.values() if isinstance(t, torch.Tensor)}
    return live, {memory(t) for t in spares.values()}


@pytest.mark.parametrize("case", list(CASES))
def test_reorders_in_a_row_follow_the_beams_in_the_memory_they_free(case):
    """Beam search reorders after every step: from the second reorder on, a linear state
    moves into the tensors an earlier one left (the decoder's spares), no spare is ever
    memory a state still uses, and decoding stays equal to one full forward of each
    row's history, through a reorder that drops a finished sentence."""
    beam, t0 = 3, 4
    h = Harness(case, B=2)
    if h.encoder_out is not None:
        h.encoder_out = h.model.encoder.reorder_encoder_out(h.encoder_out, torch.arange(2).repeat_interleave(beam))
    orders = [[1, 1, 0, 5, 3, 3], [2, 0, 1, 3, 5, 4], [0, 0, 2, 4, 4, 3], [5, 3, 3]]
    prev = decoder_input(h.d, 2 * beam, t0 + 2 * len(orders))
    history, enc, state, reused = prev[:, :t0], h.encoder_out, {}, []
    with torch.no_grad():
        h.steps(history, state, encoder_out=enc)
        for order in map(torch.tensor, orders):
            held = set().union(*live_and_spare_memory(state))
            h.model.decoder.reorder_incremental_state_scripting(state, order)
            live, spare = live_and_spare_memory(state)
            assert not live & spare
            reused.append(bool(live & held))
            enc = enc and h.model.encoder.reorder_encoder_out(enc, order)
            start = history.shape[1]
            history = torch.cat([history[order], prev[: len(order), start : start + 2]], dim=1)
            inc = h.steps(history, state, start=start, encoder_out=enc)
            torch.testing.assert_close(inc, h.full(history, encoder_out=enc)[:, start:], atol=ATOL, rtol=1e-4)
    # the spares, larger than the shrunken batch, neither stop greedy search's in-place steps
    # nor count as the state a hypothesis carries
    assert keeps_rows(state, torch.arange(3))
    from benchmarks.measure import state_bytes
    assert state_bytes(state) == sum(t.numel() * t.element_size() for key, buffer in state.items() if key != SPARES
                                     for t in buffer.values() if isinstance(t, torch.Tensor))
    linear_self = any(isinstance(m, IncrementalState) and not m.encoder_decoder_attention
                      for m in h.model.decoder.modules())
    assert all(reused[1:]) == linear_self


def host_reads(fn) -> int:
    """How many values fn() reads back to the host (on a GPU, each a wait for the device),
    as benchmarks.op_counts counts them."""
    from benchmarks import op_counts
    return op_counts.count(fn)[3]


@pytest.mark.parametrize("case", list(CASES))
def test_an_order_that_keeps_the_rows_moves_no_state(case):
    """Greedy search reorders after every step with 0..B-1: the decoder leaves every
    module's state where it is, having read one value back for the whole stack."""
    h = Harness(case, B=2)
    with torch.no_grad():
        state = {}
        h.steps(decoder_input(h.d, 2, 3), state)
        before = {key: dict(buffer) for key, buffer in state.items()}
        reads = host_reads(lambda: h.model.decoder.reorder_incremental_state_scripting(state, torch.arange(2)))
    assert reads == 1
    assert all(state[key][name] is value for key, held in before.items() for name, value in held.items())


@pytest.mark.parametrize("case", list(CASES))
def test_a_beam_reorder_off_the_cpu_reads_one_value_back_for_the_whole_stack(case, monkeypatch):
    """Off the CPU (reads_back_free False, as on a GPU) beam search's reorder reads back
    only the decoder's one answer to whether the order keeps the rows, whatever the
    layers: no module asks again, and FLASH moves its chunk's slots without reading
    their fill."""
    from linear_fairseq.ops import common
    h = Harness(case, B=2)
    with torch.no_grad():
        state = {}
        h.steps(decoder_input(h.d, 2, 3), state)
        monkeypatch.setattr(common, "reads_back_free", lambda x: False)
        reads = host_reads(lambda: h.model.decoder.reorder_incremental_state_scripting(state, torch.tensor([1, 1])))
    assert reads == 1


@pytest.mark.parametrize("case", [c for c in ENC_DEC if "softmax" not in CASES[c][1]])
def test_a_reorder_within_sentences_leaves_the_cross_attention_state_in_place(case):
    """Rows of one sentence hold the same source summary, so beam search's
    reorders (until a sentence finishes) need not copy it."""
    h = Harness(case, B=2)
    h.encoder_out = h.model.encoder.reorder_encoder_out(h.encoder_out, torch.arange(2).repeat_interleave(3))
    cross = [m for m in h.model.decoder.modules() if isinstance(m, LinearAttention) and m.encoder_decoder_attention]
    assert cross
    with torch.no_grad():
        state = {}
        h.steps(decoder_input(h.d, 6, 3), state)
        before = [dict(m._get_input_buffer(state)) for m in cross]
        h.model.decoder.reorder_incremental_state_scripting(state, torch.tensor([1, 1, 0, 5, 3, 3]))
    for m, held in zip(cross, before):
        after = m._get_input_buffer(state)
        assert held and all(after[name] is value for name, value in held.items())


@pytest.mark.parametrize("case", [c for c in ENC_DEC if "softmax" not in CASES[c][1]])
def test_the_cross_attention_summarizes_each_sentence_once_per_beam(case, monkeypatch):
    """Beam search hands the decoder one copy of each source per hypothesis:
    decoding summarizes each sentence once, and every row gets the state that
    summarizing it alone gives."""
    h = Harness(case, B=2)
    h.encoder_out = h.model.encoder.reorder_encoder_out(h.encoder_out, torch.arange(2).repeat_interleave(3))
    cross = [m for m in h.model.decoder.modules() if isinstance(m, LinearAttention) and m.encoder_decoder_attention]
    rows_summarized = []
    for m in cross:
        def counted(source, padding_mask, _summarize=m.summarize):
            rows_summarized.append(source.shape[0])
            return _summarize(source, padding_mask)
        monkeypatch.setattr(m, "summarize", counted)
    with torch.no_grad():
        state = {}
        h.steps(decoder_input(h.d, 6, 2), state)
        rows_summarized_decoding = list(rows_summarized)
        encoder_out = lazy_source.gathered(h.encoder_out)  # the rows beam search's reorder picked
        source = encoder_out["encoder_out"][0].transpose(0, 1)
        mask = encoder_out["encoder_padding_mask"][0] if encoder_out["encoder_padding_mask"] else None
        for m in cross:
            for name, value in m.summarize(source, mask).items():
                torch.testing.assert_close(m._get_input_buffer(state)[name], value, atol=1e-6, rtol=1e-5)
    assert rows_summarized_decoding == [2] * len(cross)


def state_numel(state, module=None):
    """Elements held in an incremental state (only by `module`'s submodules, if given)."""
    ids = None if module is None else tuple(
        f"{m._incremental_state_id}." for m in module.modules() if hasattr(m, "_incremental_state_id"))
    return sum(v.numel() for key, buf in state.items() if ids is None or key.startswith(ids)
               for v in buf.values() if v is not None)


def decode_states(h, lengths=(16, 64)):
    """{T: the incremental state after decoding a prefix of T tokens}; by default prefixes
    past the tiny models' first chunk, within which a state may grow on the CPU (FLASH's
    chunk buffers and sum, ops.flash.with_room and with_sum)."""
    states = {T: {} for T in lengths}
    with torch.no_grad():
        for T, state in states.items():
            h.steps(decoder_input(h.d, 4, T), state)
    return states


@pytest.mark.parametrize("case", [c for c in CASES if c not in GROWING_STATE])
def test_decode_state_does_not_grow_with_the_prefix(case):
    h = Harness(case)
    states = decode_states(h)
    assert state_numel(states[16]) == state_numel(states[64]) > 0
    attn = [m for m in h.model.decoder.modules() if isinstance(m, IncrementalState)]
    assert attn, "the decoder has no linear attention"


@pytest.mark.parametrize("case", list(HYBRID))
def test_hybrid_stack_linear_layers_keep_a_constant_state_softmax_layers_a_growing_cache(case):
    h = Harness(case)
    states = decode_states(h)
    sizes = {(i, T): state_numel(state, layer) for T, state in states.items()
             for i, layer in enumerate(h.model.decoder.layers)}
    for i, layer in enumerate(h.model.decoder.layers):
        if i in HYBRID[case]:
            assert type(layer).__name__ == "TransformerDecoderLayerBase" and sizes[i, 64] > sizes[i, 16] > 0
        else:
            assert sizes[i, 64] == sizes[i, 16] > 0, (i, type(layer).__name__)


def test_softmax_layer_indices_are_checked():
    for value, n in (("2", 2), ("0,0", 2), ("a", 2), ("-1", 2)):
        with pytest.raises(ValueError, match=f"--decoder-softmax-layers='{value}': must be distinct comma-separated "
                                             f"layer indices in 0..{n - 1}"):
            make_model("performer_lm", TINY_LM + ["--decoder-softmax-layers", value], "language_modeling")


def forced_scores(model, d, tokens, net_input=None):
    """Log-probabilities of `tokens` from one teacher-forced forward."""
    prev = torch.cat([torch.full_like(tokens[:, :1], d.eos()), tokens[:, :-1]], dim=1)
    if net_input is None:
        out = model(prev)
    else:
        out = model(net_input["src_tokens"], net_input["src_lengths"], prev)
    lprobs = model.get_normalized_probs(out, log_probs=True)
    return lprobs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


@pytest.mark.parametrize("case", list(CASES))
def test_beam_search_scores_equal_forced_decoding(case):
    h = Harness(case)
    gen = SequenceGenerator([h.model], h.d, beam_size=4, max_len_a=0, max_len_b=14, min_len=3)
    if h.encoder_out is not None:
        net_input = {"src_tokens": h.src, "src_lengths": h.src_lengths}
        prefix = None
    else:  # the LM continues a 3-token prompt
        prefix = random_tokens(h.d, 4, 3, seed=5)
        net_input = {"src_tokens": prefix, "src_lengths": torch.full((4,), 3)}
    with torch.no_grad():
        hypos = gen.forward({"net_input": net_input}, prefix_tokens=prefix)
    checked = 0
    for i, sentence in enumerate(hypos):
        for hyp in sentence:
            tokens = hyp["tokens"].unsqueeze(0)
            sub = None if prefix is not None else {k: v[i : i + 1] for k, v in net_input.items()}
            with torch.no_grad():
                expected = forced_scores(h.model, h.d, tokens, sub)[0]
            torch.testing.assert_close(hyp["positional_scores"], expected, atol=ATOL, rtol=1e-4)
            checked += 1
    assert checked == 4 * 4


def search_strategies(d):
    """name -> SequenceGenerator options: fairseq's search strategies, each of which
    reorders the hypotheses differently."""
    from fairseq import search

    return {"beam": {}, "sampling": {"search_strategy": search.Sampling(d, sampling_topk=5)},
            "diverse": {"search_strategy": search.DiverseBeamSearch(d, 2, 0.5)},
            "constrained": {"search_strategy": search.LexicallyConstrainedBeamSearch(d, "ordered")}}


@pytest.mark.parametrize("case", ENC_DEC)
def test_search_reads_the_source_once_and_finds_what_fairseqs_reorder_finds(case, monkeypatch):
    """Beam search's reorders move no source rows (lazy_source): the decoder gathers
    them once, at the first step, and every search strategy, a prefix and
    constraints included, finds the hypotheses and scores of fairseq's reorder."""
    from fairseq.models.transformer import TransformerEncoderBase
    from fairseq.token_generation_constraints import pack_constraints

    h = Harness(case)
    sample = {"net_input": {"src_tokens": h.src, "src_lengths": h.src_lengths}}
    given = {"prefix_tokens": random_tokens(h.d, 4, 2, seed=7)}
    constraints = {"constraints": pack_constraints([[random_tokens(h.d, 1, 2, seed=8 + i)[0]] for i in range(4)])}
    gathers = []
    gathered = lazy_source.gathered
    monkeypatch.setattr(lazy_source, "gathered", lambda out: gathers.append(lazy_source.ROWS in out) or gathered(out))

    def search(options, extra, fairseqs_reorder: bool):
        with monkeypatch.context() as m:
            if fairseqs_reorder:
                m.setattr(type(h.model.encoder), "reorder_encoder_out", TransformerEncoderBase.reorder_encoder_out)
            gen = SequenceGenerator([h.model], h.d, beam_size=4, max_len_a=0, max_len_b=10, min_len=3, **options)
            gathers.clear()
            torch.manual_seed(3)
            with torch.no_grad():
                return gen.generate([h.model], sample, **extra), gathers.count(True)

    for name, options in search_strategies(h.d).items():
        extra = constraints if name == "constrained" else given
        (ours, gathered_rows), (theirs, _) = (search(options, extra, fairseqs) for fairseqs in (False, True))
        assert gathered_rows == 1, name
        for sentence, their_sentence in zip(ours, theirs, strict=True):
            for hyp, their_hyp in zip(sentence, their_sentence, strict=True):
                assert torch.equal(hyp["tokens"], their_hyp["tokens"]), name
                torch.testing.assert_close(hyp["positional_scores"], their_hyp["positional_scores"])


def test_a_lazily_reordered_source_holds_no_copy_and_gathers_to_fairseqs_reorder():
    """Two reorders compose: the entries hold the encoder's own tensors and the rows
    picked (placeholders of the reordered shape, without data, in their place)."""
    from fairseq.models.transformer import TransformerEncoderBase

    h = Harness("memsizer_mt", B=2)
    lazy = h.model.encoder.reorder_encoder_out(h.encoder_out, torch.tensor([0, 1, 1, 0, 0, 1]))
    lazy = h.model.encoder.reorder_encoder_out(lazy, torch.tensor([1, 2, 0, 5]))
    source = h.encoder_out["encoder_out"][0]
    assert lazy["encoder_out"][0].is_meta and lazy["encoder_out"][0].shape == (source.shape[0], 4, source.shape[2])
    assert lazy[lazy_source.SOURCE + "encoder_out"][0] is source
    eager = TransformerEncoderBase.reorder_encoder_out(h.model.encoder, h.encoder_out, torch.tensor([1, 1, 0, 1]))
    real = lazy_source.gathered(lazy)
    assert sorted(real) == sorted(eager)
    for key, values in eager.items():
        for value, expected in zip(real[key], values):
            assert torch.equal(value, expected), key


@pytest.mark.parametrize("case", ENC_DEC)
def test_source_padding_does_not_change_a_sentence(case):
    """A short source decodes the same alone as inside a left-padded batch."""
    h = Harness(case)  # row 3 has 3 source tokens, padded to 12
    prev = decoder_input(h.d, 4, 9)
    short = h.src[3:, -3:]
    with torch.no_grad():
        in_batch = h.full(prev)[3]
        alone_enc = h.model.encoder(short, src_lengths=torch.tensor([3]))
        alone = h.model.decoder(prev[3:], encoder_out=alone_enc)[0][0]
    assert (h.src[3] == h.d.pad()).sum() == 9
    torch.testing.assert_close(in_batch, alone, atol=ATOL, rtol=1e-4)


@pytest.mark.parametrize("case", ["performer_lm", "performer_mt_rfa_gate", "flash_lm", "flash_mt_relbias",
                                  "memsizer_mt", "memsizer_lm_local", "performer_mt_local"])
def test_beam_search_on_the_fused_steps_equals_the_torch_steps(monkeypatch, triton_device, case):
    """fairseq's beam search (states reordered between steps) with every module that
    can decode on a Triton kernel (runs_on_triton) doing so finds the torch steps'
    hypotheses and scores; on CPU the kernels run through Triton's interpreter."""
    from benchmarks.op_counts import triton_modules

    h = Harness(case)
    h.model.to(triton_device)
    if h.encoder_out is not None:
        net_input = {"src_tokens": h.src, "src_lengths": h.src_lengths}
    else:
        net_input = {"src_tokens": random_tokens(h.d, 4, 3, seed=5), "src_lengths": torch.full((4,), 3)}
    net_input = {key: x.to(triton_device) for key, x in net_input.items()}
    modules = triton_modules(h.model)
    assert modules
    with torch.no_grad():  # a window's heads weighed apart (they start at 1: the kernel applies them)
        for module in modules:
            if hasattr(module, "head_weight"):
                module.head_weight.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(0))
    found = []
    for fused in (False, True):
        for module in modules:
            monkeypatch.setattr(module, "runs_on_triton", lambda x, fused=fused: fused)
        gen = SequenceGenerator([h.model], h.d, beam_size=2, max_len_a=0, max_len_b=7, min_len=3)
        with torch.no_grad():
            found.append(gen.forward({"net_input": net_input}))
    for ours, theirs in zip(*found):
        for hyp, their_hyp in zip(ours, theirs):
            assert torch.equal(hyp["tokens"], their_hyp["tokens"])
            torch.testing.assert_close(their_hyp["positional_scores"], hyp["positional_scores"], atol=ATOL, rtol=1e-4)
