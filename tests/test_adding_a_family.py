"""docs/development.md's recipe for a new family, followed by a test: a toy
attention (a running mean of projected values) added with one module class, one
builder and one models file's worth of registrations, and nothing else. It
appears in the family list every tool reads and decodes step by step exactly
as in parallel through fairseq's own decoder."""
from dataclasses import dataclass

import pytest
import torch
from fairseq.dataclass import ChoiceEnum
from fairseq.models.transformer_lm import TransformerLanguageModelConfig
from torch import nn

from conftest import TINY_LM, make_model, random_tokens
from linear_fairseq import families
from linear_fairseq.models.linear_transformer import LinearLanguageModel
from linear_fairseq.models.options import option
from linear_fairseq.modules.attention import LinearAttention, register_attention
from linear_fairseq.registry import register_model


# -- the family's module: the LinearAttention contract -----------------------------------
class RunningMean(LinearAttention):
    """out_i = W_o mean_{j <= i} W_v x_j (causal), W_o mean_j W_v x_j (non-causal)."""

    def __init__(self, embed_dim, num_heads, *, causal=False, cross=False, kv_dim=None):
        super().__init__(embed_dim, num_heads, causal=causal, cross=cross)
        self.v_proj = nn.Linear(kv_dim or embed_dim, embed_dim)
        self.out_proj = nn.Linear(embed_dim, embed_dim)

    def summarize(self, source, padding_mask):
        real = torch.ones(source.shape[:2]) if padding_mask is None else (~padding_mask).float()
        v = self.v_proj(source) * real.unsqueeze(-1)
        return {"sum": v.sum(1), "n": real.sum(1)}

    def read(self, x, state):
        return self.out_proj((state["sum"] / state["n"].clamp(min=1).unsqueeze(-1)).unsqueeze(1).expand_as(x))

    def causal_parallel(self, x, padding_mask):
        real = torch.ones(x.shape[:2]) if padding_mask is None else (~padding_mask).float()
        v = (self.v_proj(x) * real.unsqueeze(-1)).cumsum(1)
        return self.out_proj(v / real.cumsum(1).clamp(min=1).unsqueeze(-1))

    def step(self, x, state, padding_mask):
        real = torch.ones(x.shape[0]) if padding_mask is None else (~padding_mask).float()
        total = (state["sum"] if state else 0) + self.v_proj(x) * real.unsqueeze(-1)
        n = (state["n"] if state else 0) + real
        return self.out_proj(total / n.clamp(min=1).unsqueeze(-1)), {"sum": total, "n": n}


def build_running_mean(cfg, *, role, embed_dim, num_heads, kv_dim):
    return RunningMean(embed_dim, num_heads, causal=role == "decoder_self", cross=role == "cross", kv_dim=kv_dim)


@pytest.fixture(scope="module")
def toy_family():
    register_attention("runmean")(build_running_mean)

    # -- the family's models file: options, model, family entry ---------------------------
    @dataclass
    class RunMeanLMConfig(TransformerLanguageModelConfig):
        decoder_self_attn: ChoiceEnum(["softmax", "runmean"]) = option("runmean", "decoder self-attention")

    @register_model("runmean_lm", dataclass=RunMeanLMConfig)
    class RunMeanLanguageModel(LinearLanguageModel):
        pass

    family = families.register_family(families.Family("runmean", "runmean_transformer", "runmean_lm", "a test"))
    yield family
    families.FAMILIES.pop("runmean")  # the other tests see the real families only


def test_a_registered_family_is_in_the_lists_the_tools_read(toy_family):
    """The registry is where reproduce (--families), the benchmarks and the
    options reference take their lists from."""
    import scripts.options_doc as options_doc

    assert families.names()[-1] == "runmean" and families.get("runmean") is toy_family
    reference = options_doc.render()
    assert "## runmean: a test" in reference and "{softmax, runmean}" in reference


def test_the_toy_family_decodes_step_by_step_as_in_parallel(toy_family):
    model, d = make_model("runmean_lm", TINY_LM, "language_modeling")
    assert isinstance(model.decoder.layers[0].self_attn, RunningMean)
    tokens = random_tokens(d, 3, 9)
    full = model.decoder(tokens)[0]
    state, steps = {}, []
    for t in range(tokens.shape[1]):
        steps.append(model.decoder(tokens[:, : t + 1], incremental_state=state)[0][:, -1])
    torch.testing.assert_close(torch.stack(steps, 1), full, atol=1e-5, rtol=1e-5)
