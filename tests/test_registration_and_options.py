"""Plugin plumbing: registration (once, or one line why not), presets whose defaults are the
values a model really gets, checkpoint loading under torch's weights_only,
option errors that name the option and the value, one-line errors at the top
of a command, and checkpoints that do not fit explained."""
import argparse
import importlib.util
import re
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from fairseq import utils as fairseq_utils
from fairseq.models import ARCH_MODEL_REGISTRY, MODEL_DATACLASS_REGISTRY, MODEL_REGISTRY

from conftest import ROOT, TINY_LM, TINY_MT, make_model, parse_model_args
from linear_fairseq import families
from linear_fairseq.errors import ConfigError, install_excepthook
from linear_fairseq.modules.memsizer_attention import MemsizerAttention

ARCHS = [
    "memsizer_transformer", "memsizer_transformer_iwslt_de_en", "memsizer_transformer_wmt_en_de",
    "memsizer_transformer_vaswani_wmt_en_de_big", "memsizer_lm", "memsizer_lm_wiki103", "memsizer_lm_gpt",
]


def test_all_architectures_are_registered():
    assert set(ARCHS) <= set(ARCH_MODEL_REGISTRY)


def test_importing_twice_registers_once_or_says_why_not():
    # fairseq's own --user-dir import after the package was imported: nothing runs twice
    fairseq_utils.import_user_module(argparse.Namespace(user_dir=str(ROOT / "linear_fairseq")))
    assert MODEL_REGISTRY["memsizer_lm"].__module__ == "linear_fairseq.models.memsizer"
    # the same package under another module name cannot register its models again: one line says why
    spec = importlib.util.spec_from_file_location(
        "linear_fairseq_again", ROOT / "linear_fairseq" / "__init__.py",
        submodule_search_locations=[str(ROOT / "linear_fairseq")],
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        with pytest.raises(ValueError, match="model flash_transformer is already registered by "
                                              "linear_fairseq.models.flash: the plugin is imported twice, as "
                                              "linear_fairseq and linear_fairseq_again"):
            spec.loader.exec_module(module)
    finally:
        for name in [n for n in sys.modules if n.startswith("linear_fairseq_again")]:
            del sys.modules[name]


def memsizer_modules(model):
    return {name: m for name, m in model.named_modules() if isinstance(m, MemsizerAttention)}


def test_mt_default_is_the_paper_setting():
    cfg = parse_model_args("memsizer_transformer_iwslt_de_en")
    assert (cfg.encoder_embed_dim, cfg.encoder_ffn_embed_dim, cfg.encoder_attention_heads) == (512, 1024, 4)
    assert (cfg.encoder_self_attn, cfg.decoder_self_attn, cfg.cross_attn) == ("softmax", "memsizer", "memsizer")
    assert (cfg.decoder_self_memory_size, cfg.cross_memory_size) == (4, 32)
    assert (cfg.q_init_scale, cfg.kv_init_scale) == (8.0, 8.0)
    model, _ = make_model("memsizer_transformer", TINY_MT)
    attn = memsizer_modules(model)
    assert not any(name.startswith("encoder.") for name in attn)  # softmax encoder
    sizes = {name.rsplit(".", 1)[-1]: m.memory_size for name, m in attn.items()}
    assert sizes == {"self_attn": 4, "encoder_attn": 32}
    assert all(m.causal for n, m in attn.items() if n.endswith("self_attn"))


def test_lm_default_is_the_paper_setting():
    cfg = parse_model_args("memsizer_lm_wiki103", task="language_modeling")
    assert (cfg.decoder_layers, cfg.decoder_self_memory_size) == (32, 32)
    assert (cfg.q_init_scale, cfg.kv_init_scale, cfg.decoder_layerdrop) == (32.0, 1.0, 0.2)
    assert cfg.adaptive_input and cfg.decoder_normalize_before
    gpt = parse_model_args("memsizer_lm_gpt", task="language_modeling")
    assert (gpt.decoder_embed_dim, gpt.decoder_layers, gpt.decoder_self_memory_size) == (768, 12, 32)


def test_command_line_overrides_a_preset():
    cfg = parse_model_args(
        "memsizer_transformer_wmt_en_de", ["--decoder-self-memory-size", "8", "--encoder-layers", "3"]
    )
    assert (cfg.decoder_self_memory_size, cfg.encoder_layers, cfg.cross_memory_size) == (8, 3, 32)
    model, _ = make_model("memsizer_transformer", TINY_MT + ["--decoder-self-memory-size", "8"])
    assert {m.memory_size for n, m in memsizer_modules(model).items() if n.endswith("self_attn")} == {8}


@pytest.mark.parametrize(
    "arch,args,message",
    [
        ("memsizer_transformer", ["--decoder-self-memory-size", "0"], "--decoder-self-memory-size=0: must be a positive integer"),
        ("memsizer_transformer", ["--cross-memory-size", "-3"], "--cross-memory-size=-3: must be a positive integer"),
        ("memsizer_transformer", ["--encoder-self-attn", "memsizer", "--encoder-self-memory-size", "0"],
         "--encoder-self-memory-size=0"),
        ("memsizer_transformer", ["--decoder-attention-heads", "3"],
         "--decoder-attention-heads=3 must be a positive divisor of --decoder-embed-dim=32"),
        ("memsizer_transformer", ["--q-init-scale", "0"], "--q-init-scale=0.0: must be > 0"),
        ("memsizer_transformer", ["--memsizer-chunk-size", "0"], "--memsizer-chunk-size=0"),
        ("memsizer_lm", ["--decoder-self-memory-size", "0"], "--decoder-self-memory-size=0"),
        ("flash_lm", ["--gau-chunk-size", "0"], "--gau-chunk-size=0: must be a positive integer"),
        ("flash_lm", ["--gau-s", "64"], "--gau-s=64: must be <= --decoder-embed-dim=32"),
        ("flash_lm", ["--gau-s", "15"], "--gau-s=15: must be even with RoPE"),
        ("performer_lm", ["--num-features", "0"], "--num-features=0: must be a positive integer"),
        ("performer_lm", ["--kernel-chunk-size", "0"], "--kernel-chunk-size=0: must be a positive integer"),
        ("performer_lm", ["--decoder-softmax-layers", "0,1", "--train-attention-only"],
         "--train-attention-only=True: this model has no linear attention to train"),
    ],
)
def test_bad_options_name_the_option_and_value(arch, args, message):
    base, task = (TINY_LM, "language_modeling") if arch.endswith("_lm") else (TINY_MT, "translation")
    with pytest.raises(ValueError) as err:
        make_model(arch, base + args, task)
    assert message in str(err.value)


def test_unknown_attention_name_is_rejected_by_the_parser(capsys):
    with pytest.raises(SystemExit):
        parse_model_args("memsizer_transformer", ["--decoder-self-attn", "fast"])
    assert "invalid choice: 'fast'" in capsys.readouterr().err


def test_unknown_feature_map_is_rejected_by_the_parser(capsys):
    with pytest.raises(SystemExit):
        parse_model_args("performer_lm", ["--feature-map", "relu"], "language_modeling")
    assert "--feature-map: invalid choice: 'relu'" in capsys.readouterr().err


def test_module_rejects_bad_sizes_with_values():
    with pytest.raises(ValueError, match="num_heads=3 must be a positive divisor of embed_dim=32"):
        MemsizerAttention(32, 3, memory_size=4, **MEMSIZER_OPTIONS)
    with pytest.raises(ValueError, match="MemsizerAttention: memory_size=0 must be a positive integer"):
        MemsizerAttention(32, 4, memory_size=0, **MEMSIZER_OPTIONS)


MEMSIZER_OPTIONS = dict(q_init_scale=1.0, kv_init_scale=1.0, memsizer_chunk_size=64)


def test_argparse_checkpoints_load_under_weights_only_in_a_fairseq_command(tmp_path):
    """fairseq's softmax baselines pickle a Namespace; in a fairseq command the
    plugin allow-lists it. Imported anywhere else, it leaves torch as it was."""
    path = tmp_path / "legacy.pt"
    torch.save({"args": argparse.Namespace(arch="transformer"), "model": {"w": torch.ones(2)}}, path)
    code = f"import torch; torch.load({str(path)!r}); print('ok')"
    as_command = "import sys; sys.argv[0] = '/venv/bin/fairseq-generate'; import linear_fairseq; "
    for prefix, loads in (("", False), ("import linear_fairseq; ", False), (as_command, True)):
        result = subprocess.run([sys.executable, "-c", prefix + code], capture_output=True, text=True, cwd=ROOT)
        assert (result.returncode == 0) == loads, (prefix, result.stderr[-2000:])
        assert loads or "Namespace" in result.stderr  # stock torch refuses it


def test_importing_the_package_registers_models_and_nothing_else():
    code = ("import sys, warnings, logging, fairseq.models, fairseq.modules; "  # what fairseq itself sets, first
            "hook, filters = sys.excepthook, list(warnings.filters); "
            "import linear_fairseq; from fairseq.models import MODEL_REGISTRY; "
            "assert 'memsizer_lm' in MODEL_REGISTRY; assert sys.excepthook is hook, 'excepthook'; "
            "assert warnings.filters == filters, 'warning filters'; "
            "assert not logging.getLogger('fairseq_cli.train').filters, 'log filters'; print('ok')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-2000:]


def test_our_errors_print_one_line_at_the_top_of_a_command(capsys, monkeypatch):
    """Importing the plugin installs the hook (the CLI tests in test_reliability.py
    see it at work); here the hook itself, on the exceptions it may meet."""
    install_excepthook()
    assert getattr(sys.excepthook, "linear_fairseq", False)

    def report(exc):
        try:
            raise exc
        except BaseException as caught:
            sys.excepthook(type(caught), caught, caught.__traceback__)
        return capsys.readouterr().err

    assert report(ConfigError("--gau-s=64: must be <= 32")) == "error: --gau-s=64: must be <= 32\n"
    try:
        raise ConfigError("inner")
    except ConfigError:
        try:
            raise Exception("Cannot load model parameters")
        except Exception as outer:
            wrapped = outer
    assert report(wrapped) == "error: Cannot load model parameters\nerror: inner\n"
    assert "Traceback" in report(KeyError("not ours"))  # other errors keep their traceback
    # fairseq's own failures that a flag explains get the fix, when that flag was given
    monkeypatch.setattr(sys, "argv", ["fairseq-train", "data", "--fp16", "--cpu"])
    assert report(AssertionError("Torch not compiled with CUDA enabled")) == (
        "error: --fp16 without a GPU: fairseq flattens the fp32 master gradients on CUDA; "
        "add --fp16-no-flatten-grads\n")
    monkeypatch.setattr(sys, "argv", ["fairseq-train", "data", "--bf16"])
    assert report(AttributeError("'NoneType' object has no attribute 'xla_device'")).startswith(
        "error: fairseq-train --bf16 turns on fairseq's TPU path")
    monkeypatch.setattr(sys, "argv", ["fairseq-train", "data"])
    assert "Traceback" in report(AssertionError("Torch not compiled with CUDA enabled"))  # no --fp16: not ours
    monkeypatch.setenv("LINEAR_FAIRSEQ_TRACEBACK", "1")
    assert "Traceback" in report(ConfigError("shown in full"))


def test_checkpoint_of_another_vocabulary_or_architecture_is_explained():
    model, _ = make_model("memsizer_lm", TINY_LM, "language_modeling", vocab=40)
    bigger, _ = make_model("memsizer_lm", TINY_LM, "language_modeling", vocab=48)
    with pytest.raises(ConfigError, match=r"vocabulary has 52 entries, this task's dictionary 44"):
        model.load_state_dict(bigger.state_dict())
    performer, _ = make_model("performer_lm", TINY_LM, "language_modeling", vocab=40)
    with pytest.raises(ConfigError, match="trained with another architecture or attention") as err:
        model.load_state_dict(performer.state_dict())
    assert re.search(r"lacks \d+ entries this MemsizerLanguageModel has \(decoder\.layers\.0\..*"
                     r"and has \d+ it does not \(decoder\.layers\.0\.", str(err.value)), str(err.value)


@pytest.mark.parametrize("arch,task,extra", [
    ("memsizer_lm", "language_modeling", TINY_LM),
    ("performer_lm", "language_modeling", TINY_LM + ["--feature-map", "t2r"]),
    ("flash_lm", "language_modeling", TINY_LM + ["--gau-s", "16"]),
    ("memsizer_transformer", "translation", TINY_MT + ["--cross-attn", "softmax"]),
    ("flash_transformer", "translation", TINY_MT + ["--gau-s", "16"]),
])
def test_models_build_from_an_argparse_namespace_as_from_the_dataclass(arch, task, extra):
    """fairseq's build_model also takes the parsed Namespace (it converts it with
    from_namespace): the model is the same as the one built from the config."""
    from fairseq import options
    from fairseq.models import build_model

    from conftest import make_dictionary

    d = make_dictionary()
    stub = SimpleNamespace(source_dictionary=d, target_dictionary=d)
    ns = options.parse_args_and_arch(options.get_training_parser(), ["/unused", "--task", task, "--arch", arch, *extra])
    torch.manual_seed(0)
    from_namespace = build_model(ns, stub).state_dict()
    torch.manual_seed(0)
    from_config = build_model(parse_model_args(arch, extra, task), stub).state_dict()
    assert from_namespace.keys() == from_config.keys()
    for k in from_config:
        assert torch.equal(from_namespace[k], from_config[k]), k


@pytest.mark.parametrize("name", families.names(baseline=False))
def test_a_family_has_one_name_across_ops_modules_models_and_options(name):
    """The registry's name is the models' prefix, the attention key their
    --decoder-self-attn defaults to, and the stem of its ops and models files."""
    family = families.get(name)
    for model in (family.mt_model, family.lm_model):
        assert model.startswith(f"{name}_")
        assert MODEL_DATACLASS_REGISTRY[model]().decoder_self_attn == name
    assert (ROOT / "linear_fairseq" / "ops" / f"{name}.py").is_file()
    assert (ROOT / "linear_fairseq" / "models" / f"{name}.py").is_file()
    assert list((ROOT / "linear_fairseq" / "modules").glob(f"{name}_*.py"))



@pytest.mark.parametrize("option,kernels", [("gau_backend", "triton"), ("memsizer_backend", "triton"),
                                            ("local_backend", "triton"), ("kernel_backend", "fla")])
def test_a_gpu_triton_does_not_compile_for_keeps_the_torch_forms(monkeypatch, option, kernels):
    """On a CUDA GPU older than compute capability 7.0 (a P100, a GTX 1080), for which
    Triton does not compile, auto runs the torch forms, and the kernels asked for by
    name are one line naming the GPU and the way out; from 7.0 on, auto runs the kernels,
    and for a model in float64, which the kernels do not take, the torch forms (auto or
    by name)."""
    from linear_fairseq.modules import backends
    from linear_fairseq.ops import common

    capability = {"cap": (6, 0)}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index: capability["cap"])
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index: "Tesla P100-PCIE-16GB")
    common.compute_capability.cache_clear()
    on_gpu = SimpleNamespace(is_cuda=True, device=torch.device("cuda", 0), dtype=torch.float32)
    available = lambda: None  # noqa: E731  (the kernels' library imports)
    try:
        assert not backends.on_kernels(option, "auto", on_gpu, kernels, available)
        with pytest.raises(ConfigError) as error:
            backends.on_kernels(option, kernels, on_gpu, kernels, available)
        flag = "--" + option.replace("_", "-")
        assert str(error.value) == (
            f"{flag} {kernels}: Tesla P100-PCIE-16GB is of compute capability 6.0; Triton compiles for 7.0 and newer "
            f"(or {flag} auto: {kernels} where it can run, torch elsewhere; for a trained model, --model-overrides "
            f"\"{{'{option}': 'auto'}}\")")
        common.compute_capability.cache_clear()
        capability["cap"] = (7, 5)
        assert backends.on_kernels(option, "auto", on_gpu, kernels, available)
        in_float64 = SimpleNamespace(**{**vars(on_gpu), "dtype": torch.float64})
        assert not any(backends.on_kernels(option, b, in_float64, kernels, available) for b in ("auto", kernels))
    finally:
        common.compute_capability.cache_clear()
