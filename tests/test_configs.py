"""Every hydra config under configs/ loads through fairseq's own config
machinery (hydra compose with fairseq's schema, add_defaults merging the
model block into the model's dataclass) and builds its model; families of one
task share the task config and differ only in the model block."""
import argparse
import functools
import importlib.util
import re

import pytest
import torch
import yaml
from fairseq import models, tasks
from fairseq.dataclass.initialize import add_defaults, hydra_init
from fairseq.dataclass.utils import omegaconf_no_object_check
from fairseq.models.transformer import TransformerModel
from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from conftest import ROOT, make_dictionary

spec = importlib.util.spec_from_file_location("reproduce", ROOT / "scripts" / "reproduce.py")
reproduce = importlib.util.module_from_spec(spec)
spec.loader.exec_module(reproduce)
from reproduction import ablations  # noqa: E402  (importable once reproduce.py has run)
from reproduction.datasets import row_config  # noqa: E402

# every model config: each family's recommended one and, where it has one, its paper config
CASES = [(spec["task"], ds, family, model) for ds, spec in reproduce.DATASETS.items() for family in reproduce.FAMILIES
         for _, model in reproduce.model_configs(spec["task"], ds, family)]


def schema_for(ds):
    """fairseq-hydra-train's hydra_init(ds): fairseq's schema stored under the
    config's name. Only this config's: hydra copies every stored node at each
    compose, and a test process composes the configs of every dataset."""
    store = ConfigStore.instance()
    for other in reproduce.DATASETS:
        store.repo.pop(f"{other}.yaml", None)
    hydra_init(ds)


@functools.lru_cache(maxsize=None)
def load(task, ds, family, overrides=(), model=None):
    """The config fairseq-hydra-train would run (model=<ds>_<family> unless `model`
    names another model config), as a plain OmegaConf tree."""
    schema_for(ds)
    with initialize_config_dir(config_dir=str(ROOT / "configs" / task), version_base="1.1"):
        cfg = compose(config_name=ds, overrides=[f"model={model or f'{ds}_{family}'}", "task.data=/unused", *overrides])
    add_defaults(cfg)  # merges the model block into its dataclass: unknown keys fail here
    with omegaconf_no_object_check():
        return OmegaConf.create(OmegaConf.to_container(cfg, resolve=True, enum_to_str=True))


def build(cfg, vocab):
    d = make_dictionary(vocab)
    if cfg.task._name == "language_modeling":
        task = tasks.language_modeling.LanguageModelingTask(cfg.task, d, d)
    else:
        task = tasks.translation.TranslationTask(cfg.task, d, d)
    with torch.device("meta"):  # shapes and checks only, no memory
        return models.build_model(cfg.model, task)


def legacy_transformer_options():
    parser = argparse.ArgumentParser()
    TransformerModel.add_args(parser)
    return {a.dest for a in parser._actions}


def model_keys(task, ds, family):
    cfg = OmegaConf.load(ROOT / "configs" / task / "model" / f"{ds}_{family}.yaml")
    return set(cfg.keys()) - {"_name"}


@pytest.mark.parametrize("task,ds,family,model", CASES, ids=[m for *_, m in CASES])
def test_config_loads_and_builds(task, ds, family, model):
    cfg = load(task, ds, family, model=model)
    yaml_model = OmegaConf.load(ROOT / "configs" / task / "model" / f"{model}.yaml")
    assert cfg.model._name == OmegaConf.load(ROOT / "configs" / task / "model" / f"{ds}_{family}.yaml")._name
    if cfg.model._name == "transformer":  # fairseq's argparse model: check the names by hand
        unknown = model_keys(task, ds, family) - legacy_transformer_options()
        assert not unknown, f"not transformer options: {unknown}"
    else:  # merged into our dataclass: every key of the file is there with its value (a paper
        # config's own values over the recommended config it extends)
        for key, value in yaml_model.items():
            if key != "defaults":
                assert cfg.model[key] == value, key
    model = build(cfg, 70000 if ds == "wikitext103" else 1000)
    assert type(model).__name__.lower().startswith(family if family != "transformer" else "transformer")
    assert sum(p.numel() for p in model.parameters()) > 0


@pytest.mark.parametrize("ds", sorted(reproduce.DATASETS))
def test_families_share_the_task_config(ds):
    task = reproduce.DATASETS[ds]["task"]
    base = {f: load(task, ds, f) for f in reproduce.FAMILIES}
    blocks = {f: {k: v for k, v in cfg.items() if k not in ("model", "job_logging_cfg")} for f, cfg in base.items()}
    first = blocks[reproduce.FAMILIES[0]]
    assert all(b == first for b in blocks.values())


@pytest.mark.parametrize("ds", ["wmt16", "iwslt14", "cnn_dm", "wikitext103"])
def test_paper_scale_flash_and_performer_match_the_baseline_size(ds):
    """Matched parameter counts (within 25%) at paper scale; MemSizer follows
    its paper instead (no attention projections; 32 layers for WikiText-103)."""
    task = reproduce.DATASETS[ds]["task"]
    vocab = 70000 if ds == "wikitext103" else 32000
    n = {f: sum(p.numel() for p in build(load(task, ds, f), vocab).parameters())
         for f in ("transformer", "performer", "flash")}
    for family in ("performer", "flash"):
        assert abs(n[family] / n["transformer"] - 1) < 0.25, (family, n)


def test_a_misspelled_model_option_is_refused():
    with pytest.raises(Exception, match="decoder_self_memory_sise"):
        load("mt", "multi30k", "memsizer", ("+model.decoder_self_memory_sise=4",))


def test_the_memsizer_wmt16_config_is_the_papers_recipe():
    cfg = load("mt", "wmt16", "memsizer")
    assert (cfg.model.decoder_self_attn, cfg.model.cross_attn, cfg.model.encoder_self_attn) == ("memsizer", "memsizer", "softmax")
    assert (cfg.model.decoder_self_memory_size, cfg.model.cross_memory_size) == (4, 32)
    assert (cfg.model.encoder_embed_dim, cfg.model.encoder_ffn_embed_dim, cfg.model.encoder_attention_heads) == (1024, 4096, 16)
    assert cfg.optimization.lr == [0.0005] and cfg.lr_scheduler.warmup_updates == 4000
    assert cfg.optimization.max_update == 90000
    assert reproduce.DATASETS["wmt16"]["decode"][:4] == ["--beam", "4", "--lenpen", "0.6"]


GRIDS = sorted((p.parent.parent.name, p.stem) for p in (ROOT / "configs").glob("*/ablations/*.yaml"))


@pytest.mark.parametrize("task,grid", GRIDS, ids=[f"{t}-{g}" for t, g in GRIDS])
def test_every_ablation_row_composes(task, grid):
    """Each row of each grid: its start config (the grid's `config:` kind, paper
    by default, where the family has that file: a paper grid falls back to the
    config without local precision, then the recommended one) plus the row's
    overrides is a config fairseq-hydra-train accepts."""
    spec = reproduce.load_ablations(task, grid)
    ds = reproduce.DEFAULT_DATASET[(task, "cpu")]
    fallback = {"recommended": [""], "nolocal": ["_nolocal", ""], "paper": ["_paper", "_nolocal", ""]}
    for rid, row in spec["rows"].items():
        model = row_config(task, ds, row["family"], spec)
        overrides = [*row.get("budget", spec["budget"]), *row.get("set", [])]
        cfg = load(task, ds, row["family"], tuple(overrides), model=model)
        names = [f"{ds}_{row['family']}{suffix}" for suffix in fallback[spec.get("config", "paper")]]
        assert model == next(n for n in names if (ROOT / "configs" / task / "model" / f"{n}.yaml").is_file()), rid
        for override in row.get("set", []):
            key, value = override.lstrip("+").split("=", 1)
            assert OmegaConf.select(cfg, key) == yaml.safe_load(value), (rid, key)  # the value hydra parses


@pytest.mark.parametrize("task,grid", GRIDS, ids=[f"{t}-{g}" for t, g in GRIDS])
def test_every_recorded_grid_run_was_trained_with_todays_configs(task, grid):
    """Each run in a grid's committed results/<table>.runs.csv carries the key
    (overrides, starting point) and settings digest (config values, overrides)
    that the grid and its config files give today, so the grid's command from
    a fresh clone keeps every recorded run and retrains none: a change to a
    config a grid starts from either re-runs the grid or pins the grid to a
    config kind that keeps its runs (`config: nolocal`). Runs recorded before
    digests were kept have an empty digest."""
    spec = reproduce.load_ablations(task, grid)
    ds = reproduce.DEFAULT_DATASET[(task, "cpu")]
    path = ROOT / "results" / f"{spec.get('table', f'ablations-{task}')}.runs.csv"
    if not path.is_file():
        pytest.skip(f"{path.name} not committed")
    rows = {(rid, str(seed)): (row, seed) for rid, row, seed in ablations.ablation_runs(spec, None)}
    for record in reproduce.read_csv(path):
        row, seed = rows[(record["row"], record["seed"])]
        _, _, key, settings = ablations.run_settings(task, "cpu", ds, spec, row, seed)
        assert (record["overrides"], record["settings"] or settings) == (key, settings), (path.name, record["row"], seed)


@pytest.mark.parametrize("rows,message", [
    ({"a": {"family": "memsizer"}, "b": {"family": "memsizer", "linearize_from": "a"}},
     "linearize_from 'a' must name an earlier softmax (transformer) row"),
    ({"a": {"family": "performer"}, "b": {"family": "memsizer", "finetune_from": "a"}},
     "finetune_from 'a' must name an earlier row of the same family"),
    ({"b": {"family": "memsizer", "finetune_from": "a"}, "a": {"family": "memsizer"}},
     "finetune_from 'a' must name an earlier row of the same family"),
    ({"a": {"family": "transformer"}, "b": {"family": "flash", "resume_from": "a"}},
     "resume_from 'a' must name an earlier row of the same family"),
])
def test_a_grid_row_starts_only_from_an_earlier_row_it_can_start_from(rows, message, tmp_path, monkeypatch):
    (tmp_path / "configs" / "mt" / "ablations").mkdir(parents=True)
    (tmp_path / "configs" / "mt" / "ablations" / "g.yaml").write_text(OmegaConf.to_yaml({"budget": [], "seeds": [1], "rows": rows}))
    monkeypatch.setattr(ablations, "ROOT", tmp_path)
    with pytest.raises(SystemExit, match=re.escape(message)):
        ablations.load_ablations("mt", "g")


@pytest.mark.parametrize("task,ds,family,model", [case for case in CASES if case[2] in ("memsizer", "flash")],
                         ids=lambda x: x if isinstance(x, str) else None)
def test_our_configs_raise_no_hydra_warning(task, ds, family, model):
    """Composing a config as fairseq-hydra-train does warns about nothing in the
    files under configs/ (fairseq's own schema matching and version warnings
    aside): no deprecated `# @package _group_` header, no defaults list without
    `_self_`."""
    import warnings

    schema_for(ds)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with initialize_config_dir(config_dir=str(ROOT / "configs" / task), version_base="1.1"):
            compose(config_name=ds, overrides=[f"model={model}", "task.data=/unused"])
    ours = [str(w.message) for w in caught if "_group_" in str(w.message) or "_self_" in str(w.message)]
    assert not ours, ours


def test_a_grid_call_that_trains_nothing_keeps_the_date_and_machine_of_its_runs(tmp_path):
    """The header's Run line: a call that trained runs dates itself; one that
    trained none (every run recorded) keeps the line of the table it rewrites."""
    stem = tmp_path / "grid"
    (tmp_path / "grid.md").write_text("# t\n\nCommand: `x`  \nRun 2000-01-02 on m with 3 CPUs, torch 0, 4 threads. "
                                      "Every row trains with ...\n")
    assert ablations.run_line(stem, trained=False) == "Run 2000-01-02 on m with 3 CPUs, torch 0, 4 threads"
    assert ablations.run_line(stem, trained=True) == f"Run {ablations.machine()}"
    assert ablations.run_line(tmp_path / "new", trained=False) == f"Run {ablations.machine()}"
