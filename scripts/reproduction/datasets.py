"""The datasets and model configs the reproduce scripts know: per dataset its
data-prep script, task, decoding flags and metric; the smoke-scale settings;
which model configs a family has and what a run is composed from."""
import hashlib
import json
from pathlib import Path

from omegaconf import OmegaConf

from linear_fairseq import families

ROOT = Path(__file__).resolve().parents[2]
FAMILIES = families.names()  # the softmax baseline, then every registered family


SP = ["--post-process", "sentencepiece"]

# Per dataset: its data-prep script, task, decoding flags, metric, and the
# config/model file names under configs/<task>/.
DATASETS = {
    "multi30k": dict(task="mt", prep="multi30k.py", refs="raw/{subset}.en", metric="bleu",
                     decode=["--beam", "4", "--lenpen", "1.0", "--max-len-a", "1.2", "--max-len-b", "10", *SP],
                     smoke_prep=["--limit", "3000", "--eval-limit", "60", "--vocab", "1000"]),
    "iwslt14": dict(task="mt", prep="iwslt14.py", refs="raw/{subset}.en", metric="bleu",
                    decode=["--beam", "5", "--lenpen", "1.0", "--max-len-a", "1.2", "--max-len-b", "10", *SP]),
    "wmt16": dict(task="mt", prep="wmt16_en_de.py", refs="raw/{subset}.de", metric="bleu",
                  decode=["--beam", "4", "--lenpen", "0.6", "--max-len-a", "1.2", "--max-len-b", "10",
                          "--post-process", "subword_nmt"]),
    "news": dict(task="sum", prep="news.py", refs="raw/{subset}.sum", metric="rouge",
                 decode=["--beam", "4", "--lenpen", "1.0", "--max-len-b", "80", "--no-repeat-ngram-size", "3", *SP],
                 smoke_prep=["--limit", "300", "--eval-limit", "20", "--vocab", "1000", "--max-source", "120"]),
    "cnn_dm": dict(task="sum", prep="cnn_dm.py", refs="raw/{subset}.sum", metric="rouge",
                   decode=["--beam", "4", "--lenpen", "2.0", "--min-len", "55", "--max-len-b", "140",
                           "--no-repeat-ngram-size", "3", *SP]),
    "austen": dict(task="lm", prep="austen.py", metric="ppl",
                   decode=["--tokens-per-sample", "256", "--context-window", "128"],
                   smoke_prep=["--limit", "400", "--eval-limit", "40", "--vocab", "1000"]),
    "wikitext103": dict(task="lm", prep="wikitext103.py", metric="ppl",
                        decode=["--tokens-per-sample", "512", "--context-window", "400", "--softmax-batch", "1024"]),
}
DEFAULT_DATASET = {("mt", "cpu"): "multi30k", ("mt", "paper"): "wmt16", ("sum", "cpu"): "news",
                   ("sum", "paper"): "cnn_dm", ("lm", "cpu"): "austen", ("lm", "paper"): "wikitext103"}

# Smoke scale: the cpu config with a tiny model and a few dozen updates.
SMOKE = {
    "mt": ["optimization.max_epoch=0", "optimization.max_update=16", "lr_scheduler.warmup_updates=8",
           "dataset.max_tokens=2048"],
    "lm": ["optimization.max_epoch=0", "optimization.max_update=30", "lr_scheduler.warmup_updates=10",
           "task.tokens_per_sample=128", "dataset.max_tokens=2048"],
}
SMOKE["sum"] = SMOKE["mt"]
SMOKE_MODEL = {
    "mt": ["model.encoder_layers=1", "model.decoder_layers=1", "model.encoder_embed_dim=32", "model.decoder_embed_dim=32"],
    "lm": ["model.decoder_layers=1", "model.decoder_embed_dim=32", "model.decoder_input_dim=32", "model.decoder_output_dim=32"],
}
SMOKE_MODEL["sum"] = SMOKE_MODEL["mt"]
SMOKE_DECODE = {"lm": ["--tokens-per-sample", "128", "--context-window", "64"]}


def smoke_family(family: str) -> list:
    """The family's own smoke-scale model options (Family.smoke), as hydra overrides."""
    return [f"model.{name}={value}" for name, value in families.get(family).smoke.items()]

# Published numbers for exactly these setups, with their source; n/a elsewhere.
PAPER = {
    ("wmt16", "transformer"): "28.4 (Vaswani et al. 2017, big, newstest2014, tokenized BLEU)",
}


# --configs: the model config file's suffix. nolocal: the recommended config without
# local precision (--short-conv, --local-window), where the recommended one has it
CONFIG_KINDS = {"recommended": "", "paper": "_paper", "nolocal": "_nolocal"}


def model_configs(task: str, ds: str, family: str, kinds=tuple(CONFIG_KINDS)) -> list:
    """(kind, model config name) for each of `kinds` the family has under
    configs/<task>/model/: every family has its recommended config; a paper
    config exists where the paper sets the family up otherwise, a nolocal one
    where the recommended config adds local precision."""
    names = [(kind, f"{ds}_{family}{CONFIG_KINDS[kind]}") for kind in kinds]
    return [(kind, name) for kind, name in names if (ROOT / "configs" / task / "model" / f"{name}.yaml").is_file()]


def model_files(task: str, model: str) -> list:
    """A model config's YAML file after the files it extends (`defaults`)."""

    folder = ROOT / "configs" / task / "model"
    bases = OmegaConf.load(folder / f"{model}.yaml").get("defaults", [])
    return [*(folder / f"{base}.yaml" for base in bases), folder / f"{model}.yaml"]


def model_config(task: str, model: str) -> dict:
    """A model config's values, `_name` included, after the files it extends."""
    merged = OmegaConf.merge(*(OmegaConf.load(f) for f in model_files(task, model)))
    return {k: v for k, v in OmegaConf.to_container(merged).items() if k != "defaults"}


def settings_digest(task: str, config: str, model: str, overrides) -> str:
    """A digest of what a run trains with: the task config's content (comments
    aside, and a `_self_` that ends its defaults list: Hydra puts a file's own
    values after its defaults either way), the model config's values (so a
    model file split or renamed with the same values keeps its runs) and the
    overrides."""
    task_config = OmegaConf.to_container(OmegaConf.load(ROOT / "configs" / task / f"{config}.yaml"))
    if (task_config.get("defaults") or [None])[-1] == "_self_":
        task_config["defaults"] = task_config["defaults"][:-1]
    settings = [task_config, model_config(task, model), list(overrides)]
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


def model_values(task: str, model: str, overrides) -> list:
    """KEY=VALUE for every option of a model config (a file it extends through
    `defaults` first), then the model.* hydra overrides."""

    config = model_config(task, model)
    values = {k: json.dumps(v) for k, v in config.items() if k != "_name"}
    for override in overrides:
        key, _, value = override.lstrip("+").partition("=")
        if key.startswith("model."):
            values[key[len("model."):]] = value
    return [config["_name"], [f"{k}={v}" for k, v in values.items()]]


# A grid's `config:` kind -> the kinds its rows fall back to, last first: a
# paper config where the family has one, else its config without local
# precision (no paper uses it), else its recommended one
GRID_FALLBACK = {"recommended": ("recommended",), "nolocal": ("recommended", "nolocal"),
                 "paper": ("recommended", "nolocal", "paper")}


def row_config(task: str, ds: str, family: str, spec: dict) -> str:
    """The model config a grid's rows start from: the family's config of the
    grid's kind (`config: paper`, the default; nolocal; recommended) where it
    has one, else the next kind of GRID_FALLBACK."""
    return model_configs(task, ds, family, GRID_FALLBACK[spec.get("config", "paper")])[-1][1]


def model_name(task: str, ds: str, family: str) -> str:
    """The fairseq model (`_name`) of the family's model config for `ds`."""
    return str(OmegaConf.load(ROOT / "configs" / task / "model" / f"{ds}_{family}.yaml").get("_name", family))
