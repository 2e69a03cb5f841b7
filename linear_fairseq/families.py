"""The registry of attention families. Each family's models file registers one
entry; the reproduce scripts, the benchmarks, the generated docs and the tests
take their lists from here, so a new family appears everywhere by registering.

No fairseq import: ``scripts/`` and ``benchmarks/`` read it cheaply.
"""
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple


@dataclass(frozen=True)
class Family:
    name: str  # the one name: --families, configs/<task>/model/<dataset>_<name>.yaml, table rows
    mt_model: str  # registered fairseq model names
    lm_model: str
    paper: str  # title and arXiv id
    # flags that bring the benchmarks' models to the softmax baseline's parameter count
    bench_mt_args: Tuple[str, ...] = ()
    bench_lm_args: Tuple[str, ...] = ()
    # linearize (python -m linear_fairseq.linearize): (tensor name, softmax state dict) ->
    # (value, how it was derived) for a tensor derived from the softmax weights, else None
    from_softmax: Optional[Callable[[str, dict], Optional[tuple]]] = None


BASELINE = Family("transformer", "transformer", "transformer_lm", "Attention Is All You Need, arXiv 1706.03762")
FAMILIES: Dict[str, Family] = {}


def register_family(family: Family) -> Family:
    """Add `family` (a second registration of the same entry is a no-op)."""
    if FAMILIES.get(family.name, family) != family:
        raise ValueError(f"family {family.name!r} is already registered differently")
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
