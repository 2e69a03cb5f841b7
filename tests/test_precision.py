"""Half precision in every family's models (bf16 and fp16 weights and
activations, as fairseq's --bf16/--fp16 run them), and 16k decoding steps in
fp32 that stay on the parallel form."""
import pytest
import torch
from fairseq.sequence_generator import SequenceGenerator

from linear_fairseq import families
from linear_fairseq.modules.flash_gau import GatedAttentionUnit
from test_decoding_contract import Harness, decoder_input

MODELS = [f"{family}_{kind}" for family in families.FAMILIES for kind in ("mt", "lm")]
# largest |log-prob| difference allowed against fp32 (bf16 keeps 8 significant bits, fp16 11)
TOL = {torch.bfloat16: 0.15, torch.float16: 0.03}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", MODELS)
def test_half_precision_follows_fp32_in_training_and_decoding_forms(case, dtype):
    h = Harness(case)
    prev = decoder_input(h.d, 4, 40)
    with torch.no_grad():
        ref = h.full(prev).float().log_softmax(-1)
        h.model.to(dtype)
        if h.encoder_out is not None:
            h.encoder_out = h.model.encoder(h.src, src_lengths=h.src_lengths)
        full = h.full(prev).float().log_softmax(-1)
        steps = h.steps(prev, {}).float().log_softmax(-1)
    assert torch.isfinite(full).all() and torch.isfinite(steps).all()
    assert (full - ref).abs().max() < TOL[dtype]
    assert (steps - full).abs().max() < TOL[dtype]

    # beam search in half precision: finite scores of the asked-for lengths
    if h.encoder_out is not None:
        net_input = {"src_tokens": h.src, "src_lengths": h.src_lengths}
    else:
        net_input = {"src_tokens": prev[:, 1:3], "src_lengths": torch.full((4,), 2)}
    gen = SequenceGenerator([h.model], h.d, beam_size=3, max_len_a=0, max_len_b=12, min_len=12)
    hypos = gen.generate([h.model], {"net_input": net_input})
    for beams in hypos:
        for hyp in beams:
            assert torch.isfinite(hyp["positional_scores"]).all()
            assert len(hyp["tokens"]) == 13


def causal_attention(case):
    h = Harness(case, B=2)
    layer = h.model.decoder.layers[0]
    attn = layer.gau if hasattr(layer, "gau") else layer.self_attn
    parallel = attn.parallel if isinstance(attn, GatedAttentionUnit) else attn.causal_parallel
    return attn, parallel


@pytest.mark.slow
@pytest.mark.parametrize("case", ["memsizer_lm", "flash_lm"])  # kernel attention: test_kernel_ops.py
def test_16k_decoding_steps_do_not_drift_from_the_parallel_form(case):
    """Every step of a 16,384-token decode (the recurrent state carried in fp32)
    stays within 1e-4 (relative to the output scale) of the parallel training
    form at the same position, and of the same attention computed in float64:
    summing 16k terms in fp32 loses a little precision, but nothing drifts.
    The attention is where state accumulates, so it is run on its own: a whole
    LM costs ~2 ms a step here in fairseq's decoder machinery."""
    attn, parallel = causal_attention(case)
    T = 16384
    x = torch.randn(2, T, attn.embed_dim, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = parallel(x, None)
        state, outs = {}, []
        for t in range(T):
            out, state = attn.step(x[:, t], state, None)
            outs.append(out)
        steps = torch.stack(outs, dim=1)
        attn.double()
        exact = parallel(x.double(), None)
    scale = float(exact.abs().max().clamp(min=1.0))
    for name, got in (("parallel", ref), ("steps", steps)):
        err = (got.double() - exact).abs()
        per_4k = [float(err[:, i:i + 4096].max()) / scale for i in range(0, T, 4096)]
        assert max(per_4k) < 1e-4, (name, per_4k)
    assert float((steps - ref).abs().max()) / scale < 1e-4
