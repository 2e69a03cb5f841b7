"""The models every suite compares: fairseq's softmax baselines and one model
per family at (nearly) the same parameter count, built through fairseq's own
option parsing exactly as `fairseq-train --arch ARCH ARGS` would build them,
with untrained weights (speed and memory do not depend on the values)."""
from pathlib import Path
from types import SimpleNamespace

import torch
from fairseq import options
from fairseq.data import Dictionary
from fairseq.models import ARCH_MODEL_NAME_REGISTRY, MODEL_DATACLASS_REGISTRY, build_model
from omegaconf import OmegaConf

import linear_fairseq  # noqa: F401  registers the families
from linear_fairseq import families
from scripts.reproduction.datasets import model_config

VOCAB = 8192
MAX_POSITIONS = 16400  # > the longest generation (16384 tokens + eos)

# Decoder-only: d=256, 4 layers, FFN 1024, 4 heads. Each family brings its own
# flags to match the baseline's parameter count (Family.bench_lm_args): MemSizer's
# attention has fewer weights, so its FFN is widened; a GAU stands in for
# attention + FFN, so FLASH has twice the layers (as in its paper). The
# embeddings and output layer keep transformer_lm's defaults, 512 wide
# (--decoder-input-dim, --decoder-output-dim), projected to and from d, the
# same for every family.
LM_BASE = (
    f"--decoder-layers 4 --decoder-embed-dim 256 --decoder-ffn-embed-dim 1024 "
    f"--decoder-attention-heads 4 --dropout 0 --share-decoder-input-output-embed "
    f"--tokens-per-sample {MAX_POSITIONS}"
).split()
LM = {f: (families.get(f).lm_model, list(families.get(f).bench_lm_args)) for f in families.names()}

# Encoder-decoder: d=256, 3+3 layers, FFN 1024, 4 heads, shared embeddings
# (Family.bench_mt_args: memsizer_transformer keeps its paper's layout with a
# wider decoder FFN; FLASH's 5+5 GAU layers come closest to the baseline's count).
MT_BASE = (
    "--encoder-layers 3 --decoder-layers 3 --encoder-embed-dim 256 --decoder-embed-dim 256 "
    "--encoder-ffn-embed-dim 1024 --decoder-ffn-embed-dim 1024 "
    "--encoder-attention-heads 4 --decoder-attention-heads 4 --dropout 0 --share-all-embeddings "
    f"--max-source-positions {MAX_POSITIONS} --max-target-positions {MAX_POSITIONS}"
).split()
MT = {f: (families.get(f).mt_model, list(families.get(f).bench_mt_args)) for f in families.names()}
FAMILIES = families.names()
PLACEMENTS = ("paper", "recommended")
RECOMMENDED = Path(__file__).resolve().parents[1] / "configs" / "mt" / "model"


def family_list(parser, text: str) -> list:
    """--families a,b as a list, every name checked (parser.error names an unknown one)."""
    names = text.split(",")
    unknown = [f for f in names if f not in FAMILIES]
    if unknown:
        parser.error(f"--families: unknown family {unknown[0]!r} (choose from {', '.join(FAMILIES)})")
    return names


def placement_args(family: str, placement: str) -> list:
    """Flags that put a family's attention where `placement` says: "paper", the
    models' defaults, or "recommended", the roles (the *_attn options) of the
    family's recommended Multi30k config (configs/mt/model/multi30k_<family>.yaml)."""
    if placement not in PLACEMENTS:
        raise ValueError(f"placement {placement!r}: choose from {', '.join(PLACEMENTS)}")
    if placement == "paper" or family == families.BASELINE.name:
        return []
    config = model_config("mt", f"multi30k_{family}")  # after the files it extends
    return [f"--{key.replace('_', '-')}={value}" for key, value in config.items() if key.endswith("_attn")]


def dictionary(size: int = VOCAB) -> Dictionary:
    d = Dictionary()
    for i in range(size - d.nspecial):
        d.add_symbol(f"w{i}")
    return d


def build(kind: str, family: str, device: str = "cpu", dtype=torch.float32, placement: str = "paper", extra=()):
    """(model in eval mode, dictionary, description) for kind "lm" or "mt"; an
    encoder-decoder's attention roles as `placement` says (placement_args);
    `extra`: more flags (e.g. --decoder-softmax-layers)."""
    arch, family_args = (LM if kind == "lm" else MT)[family]
    base = LM_BASE if kind == "lm" else MT_BASE
    task = "language_modeling" if kind == "lm" else "translation"
    args = [*base, *family_args, *(placement_args(family, placement) if kind == "mt" else []), *extra]
    parser = options.get_training_parser()
    ns = options.parse_args_and_arch(parser, ["/unused-data", "--task", task, "--arch", arch, *args])
    cfg = ns
    dc = MODEL_DATACLASS_REGISTRY.get(ARCH_MODEL_NAME_REGISTRY[arch])
    if dc is not None:  # what convert_namespace_to_omegaconf builds, without composing all of fairseq's config
        cfg = dc.from_namespace(ns)
        cfg._name = arch
        cfg = OmegaConf.create({"model": cfg}).model  # ${model.x} interpolations resolve
    d = dictionary()
    torch.manual_seed(0)
    model = build_model(cfg, SimpleNamespace(source_dictionary=d, target_dictionary=d))
    model = model.to(device=device, dtype=dtype).eval()
    params = sum(p.numel() for p in model.parameters())
    embed = model.decoder.embed_tokens.weight.numel()
    info = {"arch": arch, "args": " ".join(args), "params": params, "non_embedding_params": params - embed}
    return model, d, info
