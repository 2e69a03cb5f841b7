"""A toy family's models (docs/development.md's example): runmean_transformer
and runmean_lm, every attention role a decayed running mean by default (the
configs register derives: the same defaults in both model kinds)."""
from dataclasses import dataclass

from fairseq.dataclass import FairseqDataclass

from ..families import Family, Variant
from ..modules.runmean_attention import RunningMean, runmean_problems
from .family import register, role_choice
from .options import choice, option

ATTENTION = role_choice("runmean")


@dataclass
class RunMeanOptions(FairseqDataclass):
    decoder_self_attn: str = choice("runmean", ATTENTION, "decoder self-attention")
    runmean_decay: float = option(1.0, "weight of the previous mean at each step (1: a plain running mean)")


FAMILY = Family(
    "runmean", "a toy family: a decayed running mean of values",
    attention=RunningMean, options=RunMeanOptions, problems=runmean_problems,
    variants={"lm_decay": Variant("lm", ("--runmean-decay", "0.5"))},
)
RunMeanTransformerModel, RunMeanLanguageModel = register(FAMILY)
