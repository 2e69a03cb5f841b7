"""The family record: everything that makes an attention family, in one place.

A family's models file builds one ``Family`` and passes it to
``models.family.register``, which derives the rest: the attention (or layer)
registry entry, the fairseq models ``<name>_transformer`` and ``<name>_lm`` and
their presets, the choice lists of the ``--*-attn`` options, and the checks of
its options. The reproduce scripts, the benchmarks, the generated options
reference and the tests take their lists from ``FAMILIES``.

No fairseq import here: the record holds the family's classes, but this file
only stores them.
"""
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

Problem = Tuple[str, object, str]  # (option, value, why)


@dataclass(frozen=True)
class Variant:
    """Options that change a family's decoding path: the contract tests run each
    (on tiny models) besides the family's defaults."""
    kind: str  # "mt" or "lm"
    flags: Tuple[str, ...]
    growing_state: bool = False  # the decode state grows with the prefix (softmax-like)


@dataclass(frozen=True)
class Family:
    name: str  # --families, the value of --*-attn, configs/<task>/model/<dataset>_<name>.yaml, table rows
    paper: str  # title and arXiv id
    # -- the modules: an attention module class (one per attention role), or whole layers ------------
    # An attention class is built as cls(embed_dim, num_heads, kv_dim=, causal=, cross=, **options).
    attention: Optional[type] = None
    layers: Optional[Tuple[type, type]] = None  # (encoder layer, decoder layer), called like fairseq's
    # -- the options: dataclasses whose field defaults are the only defaults ---------------------------
    options: Optional[type] = None  # the family's own options; its fields are the module's keyword arguments
    mt_config: Optional[type] = None  # the encoder-decoder model's config (options with MT defaults)
    lm_config: Optional[type] = None  # the language model's config
    role_options: Tuple[str, ...] = ()  # module arguments given per role, as --<role>-<name>
    shared_options: Tuple[str, ...] = ()  # fairseq options the module reads too (--attention-dropout, ...)
    # problems(options: dict, embed_dim: int, width: str) -> [Problem]: the values the module
    # cannot take, the first one only; the module raises on it, the models name the flag
    problems: Optional[Callable[..., List[Problem]]] = None
    derive: Optional[Callable[[Any], None]] = None  # settings that follow from others (args namespace)
    mt_presets: Dict[str, Callable] = field(default_factory=dict)  # <name>_transformer_<suffix>
    lm_presets: Dict[str, Callable] = field(default_factory=dict)  # <name>_lm_<suffix>
    # -- what the tools need -----------------------------------------------------------------------
    smoke: Dict[str, Any] = field(default_factory=dict)  # model options of the smoke-scale reproduce runs
    tiny: Tuple[str, ...] = ()  # flags of the tests' tiny models
    variants: Dict[str, Variant] = field(default_factory=dict)
    # flags that bring the benchmarks' models to the softmax baseline's parameter count
    bench_mt_args: Tuple[str, ...] = ()
    bench_lm_args: Tuple[str, ...] = ()
    # benchmark targets: decode speed-up at L=256 batch 1, training speed-up by context, MT/summarization
    # speed-up by (task, source length); families not named are held to 1.0x
    targets: Dict[str, Any] = field(default_factory=dict)
    # linearize: (tensor name, softmax state dict, the tensor as initialized) -> (value, how) for a
    # tensor derived from the softmax weights, else None
    from_softmax: Optional[Callable[[str, dict, Any], Optional[tuple]]] = None
    # the fairseq model names: <name>_transformer and <name>_lm unless given
    mt_model: str = ""
    lm_model: str = ""

    def __post_init__(self):
        object.__setattr__(self, "mt_model", self.mt_model or f"{self.name}_transformer")
        object.__setattr__(self, "lm_model", self.lm_model or f"{self.name}_lm")

    def model(self, kind: str) -> str:
        return self.mt_model if kind == "mt" else self.lm_model


BASELINE = Family("transformer", "Attention Is All You Need, arXiv 1706.03762", mt_model="transformer",
                  lm_model="transformer_lm")
FAMILIES: Dict[str, Family] = {}


def add(family: Family) -> Family:
    """Add `family` to the list every tool reads."""
    if family.name in FAMILIES or family.name in ("softmax", BASELINE.name):
        raise ValueError(f"family name {family.name!r} is taken")
    FAMILIES[family.name] = family
    return family


def names(baseline: bool = True) -> Tuple[str, ...]:
    """Family names in registration order, the softmax baseline first."""
    return ((BASELINE.name,) if baseline else ()) + tuple(FAMILIES)


def get(name: str) -> Family:
    if name == BASELINE.name:
        return BASELINE
    if name not in FAMILIES:
        raise KeyError(f"unknown family {name!r} (choose from {', '.join(names())})")
    return FAMILIES[name]
