"""Turn a trained softmax checkpoint into a linear-attention one, to fine-tune.

  python -m linear_fairseq.linearize SOFTMAX_CKPT OUT_CKPT --arch ARCH [family options] [KEY=VALUE ...]

SOFTMAX_CKPT is a fairseq ``transformer*`` (translation) or ``transformer_lm*``
(language model) checkpoint; ARCH is one of this plugin's architectures of
the same kind (``memsizer_transformer``, ``performer_lm``, ...), with any of
its options (``--feature-map t2r``, ``--cross-attn softmax``, ... or as
``feature_map=t2r``, the keys of a hydra model config). The model
sizes come from the checkpoint. Every tensor of the new model is

* copied where the softmax model has a tensor of the same name and shape
  (embeddings, feed-forward layers, layer norms, output projection, kernel
  attention's q/k/v/out projections, a self-attention's q/k/v stacked into
  its qkv_proj, any role left as softmax; the projections of a
  --local-window's softmax, from the attention it joins);
* mapped where the family derives it from the softmax weights (its
  ``from_softmax`` hook in the family registry; MemSizer: W_r from the value
  then output projection);
* initialized as in a fresh model otherwise (MemSizer's key slots, T2R's and
  FAVOR+'s features, FLASH's gated attention units).

With ``--calibrate N``, the initialized parameters that shape attention
weights (T2R's feature map, RFA's gate) are then fitted to the softmax
model's attention on N training batches (linear_fairseq/calibrate.py), so the
model starts close to the softmax one; a second table gives each module's
KL divergence from the softmax weights before and after.

A table of what was copied, mapped, initialized (or calibrated) and left out is printed.
OUT_CKPT then goes to ``fairseq-train --finetune-from-model OUT_CKPT`` with the
same --arch and options (its optimizer state is not carried over), or to
``fairseq-generate --path OUT_CKPT`` as it is. The approach is that of
"Finetuning Pretrained Transformers into RNNs" (Kasai et al., arXiv 2103.13076).
"""
import argparse
import copy
import dataclasses
import itertools
import re
import sys
from collections import defaultdict
from pathlib import Path
from typing import Optional

import torch
import yaml

from . import families
from .checkpoints import allow_fairseq_checkpoints
from .errors import ConfigError
from .modules.projections import stack_apart

KINDS = {"translation": "translation", "language_modeling": "language model"}


def fail(msg: str):
    sys.exit(f"linearize: {msg}")


def load_softmax(path: Path) -> dict:
    """The checkpoint's state, refused in one line unless it holds fairseq's own
    transformer or transformer_lm."""
    from fairseq import checkpoint_utils
    from fairseq.models import ARCH_MODEL_REGISTRY
    from fairseq.models.transformer import TransformerModel
    from fairseq.models.transformer_lm import TransformerLanguageModel

    if not path.is_file():
        fail(f"{path}: no such file")
    allow_fairseq_checkpoints()  # fairseq's argparse-configured transformers pickle a Namespace
    try:
        state = checkpoint_utils.load_checkpoint_to_cpu(str(path))
    except Exception as err:  # truncated, not a checkpoint, pickled objects we cannot load
        first = (str(err).strip().splitlines() or [""])[0]
        fail(f"cannot read {path} as a fairseq checkpoint ({type(err).__name__}: {first})")
    name = state["cfg"]["model"]._name
    if ARCH_MODEL_REGISTRY.get(name) not in (TransformerModel, TransformerLanguageModel):
        fail(f"{path} holds a {name!r} model; linearize starts from fairseq's softmax transformer or transformer_lm")
    return state


def target_args(state: dict, arch: str, options_: list) -> argparse.Namespace:
    """The new model's options: ARCH and the options given (command-line flags,
    or KEY=VALUE model options as in a hydra model config), over the softmax
    model's own (sizes, dropout, embeddings sharing)."""
    from fairseq import options
    from fairseq.models import ARCH_MODEL_REGISTRY

    from .models.linear_transformer import LinearLanguageModel, LinearTransformerModel

    task = state["cfg"]["task"]._name
    want = LinearLanguageModel if task == "language_modeling" else LinearTransformerModel
    if arch not in ARCH_MODEL_REGISTRY or not issubclass(ARCH_MODEL_REGISTRY[arch], want):
        kind = "lm_model" if task == "language_modeling" else "mt_model"
        archs = [getattr(f, kind) for f in families.FAMILIES.values()]
        fail(f"--arch {arch}: not a linear {KINDS.get(task, task)} architecture; the checkpoint's task is "
             f"{task}, so choose {', '.join(archs)} (or one of their presets)")
    fields = {f.name for f in dataclasses.fields(ARCH_MODEL_REGISTRY[arch].__dataclass)}
    values = dict(opt.split("=", 1) for opt in options_ if "=" in opt and not opt.startswith("-"))
    for key in set(values) - fields:
        fail(f"{key}={values[key]}: not an option of {arch} (see docs/options.md)")
    flags = [opt for opt in options_ if not ("=" in opt and not opt.startswith("-"))]
    parser = options.get_training_parser()
    args = options.parse_args_and_arch(parser, ["/unused", "--task", task, "--arch", arch, *flags])
    for key, value in values.items():
        setattr(args, key, yaml.safe_load(value))
    given = set(values) | {parser._option_string_actions[opt.split("=")[0]].dest for opt in flags
                           if opt.split("=")[0] in parser._option_string_actions}
    model = state["cfg"]["model"]  # fairseq keeps an argparse model's options as a Namespace
    for key, value in (vars(model) if isinstance(model, argparse.Namespace) else model).items():
        if key in fields - given - {"_name", "arch"}:
            setattr(args, key, value)
    return args


def build_target(state: dict, args: argparse.Namespace):
    """The new model, freshly initialized, with the softmax model's vocabularies."""
    from types import SimpleNamespace

    from fairseq.data import Dictionary
    from fairseq.models import build_model

    def vocab(size: int) -> Dictionary:
        d = Dictionary()
        while len(d) < size:
            d.add_symbol(f"<{len(d)}>")
        return d

    weights = state["model"]
    tgt = vocab(weights["decoder.embed_tokens.weight"].shape[0])
    src = vocab(weights["encoder.embed_tokens.weight"].shape[0]) if "encoder.embed_tokens.weight" in weights else tgt
    torch.manual_seed(args.seed)
    return build_model(args, SimpleNamespace(source_dictionary=src, target_dictionary=tgt))


def transfer(source: dict, model, family) -> tuple:
    """(state dict of `model`, {tensor name: what happened to it}) with the
    tensors of `source` copied or mapped where they fit."""
    hook = family.from_softmax
    out, how, tied = {}, {}, {}
    for name, fresh in model.state_dict().items():
        if fresh.numel() and fresh.data_ptr() in tied:  # a tensor the model ties to an earlier one (shared embeddings) stays tied
            first = tied[fresh.data_ptr()]
            out[name], how[name] = out[first], f"tied: to {first}"
            continue
        tied[fresh.data_ptr()] = name
        own = softmax_tensor(source, name)
        if own is not None and own.shape == fresh.shape:
            out[name], how[name] = own.to(fresh.dtype).clone(), "copied" if name in source else "copied: q/k/v_proj stacked"
            continue
        window = name.replace(".window.", ".", 1)  # --local-window: exact softmax, from the softmax attention's
        softmax = softmax_tensor(source, window) if window != name else None
        if softmax is not None and softmax.shape == fresh.shape:
            what = pattern(window).replace("qkv_proj", "q/k/v_proj")
            out[name], how[name] = softmax.to(fresh.dtype).clone(), f"copied: {what} (the window's softmax)"
            continue
        mapped = hook(name, source, fresh) if hook else None
        if mapped is not None and mapped[0].shape == fresh.shape:
            out[name], how[name] = mapped[0].to(fresh.dtype), f"mapped: {mapped[1]}"
        else:
            out[name], how[name] = fresh, "initialized"
    for name in source:
        if name not in how:
            how[name] = "left out"
    return out, how


def softmax_tensor(source: dict, name: str) -> Optional[torch.Tensor]:
    """The softmax model's tensor `name`, or for a qkv_proj the q/k/v_proj tensors
    it stacks (None: neither)."""
    return source[name] if name in source else stack_apart(source, name)


def pattern(name: str) -> str:
    """The module a tensor belongs to, layer indices folded: decoder.layers.*.fc1."""
    return re.sub(r"\.layers\.\d+\.", ".layers.*.", name).rsplit(".", 1)[0]


def report(how: dict, sizes: dict) -> str:
    """One line per outcome and name pattern (layer indices folded)."""
    groups = defaultdict(lambda: [0, 0])
    totals = defaultdict(int)
    for name, what in how.items():
        group = groups[(what, pattern(name))]
        group[0] += 1
        group[1] += sizes[name]
        totals[what.split(":")[0]] += sizes[name]
    order = ("copied", "mapped", "calibrated", "initialized", "left out", "tied")
    lines = ["| what | tensors | parameters | module |", "| --- | --- | --- | --- |"]
    for (what, name), (n, params) in sorted(groups.items(), key=lambda g: (order.index(g[0][0].split(":")[0]), g[0][1])):
        lines.append(f"| {what} | {n} | {params:,} | {name} |")
    lines.append("")
    lines.append("parameters (a tied tensor counted once): "
                 + ", ".join(f"{totals[w]:,} {w}" for w in order[:-1] if totals[w]))
    return "\n".join(lines)


def save(state: dict, args, weights: dict, out: Path) -> None:
    """A fairseq checkpoint of the new model: the softmax checkpoint's config
    with the new model block, no optimizer state, zero updates, epoch 1."""
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf
    from omegaconf import OmegaConf, open_dict

    cfg = state["cfg"]
    with open_dict(cfg):
        cfg["model"] = convert_namespace_to_omegaconf(args).model
    last = dict(state["optimizer_history"][-1]) if state.get("optimizer_history") else {}
    history = [{**last, "num_updates": 0, "lr_scheduler_state": {}}]
    out.parent.mkdir(parents=True, exist_ok=True)
    # the config as plain containers, as fairseq saves it
    start = {"train_iterator": {"epoch": 1, "iterations_in_epoch": 0}}  # a fresh run's first epoch
    torch.save({"cfg": OmegaConf.to_container(cfg), "model": weights, "optimizer_history": history,
                "extra_state": start, "last_optimizer_state": None}, out)


def linearize(softmax: Path, out: Path, arch: str, options_=(), calibration: Optional[dict] = None) -> str:
    """Write OUT from SOFTMAX for `arch`; returns the report. calibration: the
    keyword arguments of `calibrated` (batches, steps, lr, data), or None."""
    from . import models  # noqa: F401  registers the architectures

    state = load_softmax(softmax)
    source = state["cfg"]["model"]._name  # before target_args rewrites the stored config for `arch`
    args = target_args(state, arch, list(options_))
    try:
        model = build_target(state, args)
    except ConfigError as err:
        fail(str(err))
    weights, how = transfer(state["model"], model, family_of(arch))
    fitted = calibrated(state, model, weights, how, **calibration) if calibration else ""
    sizes = {**{k: v.numel() for k, v in state["model"].items()}, **{k: v.numel() for k, v in weights.items()}}
    save(state, args, weights, out)
    head = f"linearize: {source} ({softmax}) -> {arch} ({out})"
    return head + "\n\n" + report(how, sizes) + fitted


def calibrated(state: dict, model, weights: dict, how: dict, *, batches: int, steps: int, lr: float,
               data: Optional[str]) -> str:
    """Fit `model`'s initialized attention parameters to the softmax model on
    `batches` training batches (calibrate.py); updates `weights` and `how` in
    place and returns the table of KL divergences."""
    from .calibrate import calibrate, fittable

    model.load_state_dict(weights)
    initialized = {name for name, what in how.items() if what == "initialized"}
    targets = fittable(model, initialized)
    if not targets:
        fail(f"--calibrate {batches}: this model has no new attention parameters to fit (T2R's feature map, "
             "RFA's gate); leave --calibrate out")
    softmax_model, samples = training_batches(state, data, batches, seed=int(state["cfg"]["common"]["seed"]))
    losses = calibrate(targets, softmax_model, samples, steps, lr)
    fitted = model.state_dict()
    for module, (_, params) in targets.items():
        for name in (f"{module}.{param}" for param in params):
            weights[name], how[name] = fitted[name], "calibrated"
    lines = [f"\n\ncalibrated on {len(samples)} training batches, {steps} Adam steps (lr {lr}) a module: "
             "KL(softmax || linear attention weights), mean over queries", "",
             "| module | before | after |", "| --- | --- | --- |"]
    lines += [f"| {name} | {before:.4f} | {after:.4f} |" for name, (before, after) in losses.items()]
    return "\n".join(lines)


def training_batches(state: dict, data: Optional[str], count: int, seed: int) -> tuple:
    """(the softmax model, the first `count` shuffled training batches of the data
    it trained on, or of `data`: binarized data with the same vocabularies)."""
    from fairseq import tasks, utils

    cfg = copy.deepcopy(state["cfg"])
    if data is not None:
        cfg.task.data = data
    try:
        task = tasks.setup_task(cfg.task)
        softmax_model = task.build_model(cfg.model)
        softmax_model.load_state_dict(state["model"])
        task.load_dataset(cfg.dataset.train_subset)
    except (FileNotFoundError, RuntimeError, OSError) as err:
        first = (str(err).strip().splitlines() or [""])[0]
        fail(f"--data {cfg.task.data}: cannot load the softmax model's training data there ({first}); "
             "give --data the binarized data it trained on")
    dataset = task.dataset(cfg.dataset.train_subset)
    positions = utils.resolve_max_positions(task.max_positions(), softmax_model.max_positions())
    itr = task.get_batch_iterator(dataset=dataset, max_tokens=cfg.dataset.max_tokens,
                                  max_sentences=cfg.dataset.batch_size, max_positions=positions,
                                  ignore_invalid_inputs=True, seed=seed).next_epoch_itr(shuffle=True)
    return softmax_model, list(itertools.islice(itr, count))


def family_of(arch: str):
    """The registered family whose models `arch` builds."""
    from fairseq.models import ARCH_MODEL_NAME_REGISTRY

    model = ARCH_MODEL_NAME_REGISTRY[arch]
    return next(f for f in families.FAMILIES.values() if model in (f.mt_model, f.lm_model))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m linear_fairseq.linearize", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("softmax", type=Path, help="a fairseq transformer / transformer_lm checkpoint")
    ap.add_argument("out", type=Path, help="where the linear model's checkpoint goes")
    ap.add_argument("--arch", required=True, help="a linear architecture of the same kind (e.g. memsizer_transformer)")
    ap.add_argument("--calibrate", type=int, default=0, metavar="N",
                    help="fit the new attention parameters (T2R's feature map, RFA's gate) to the softmax "
                         "attention on N training batches before writing (0: off)")
    ap.add_argument("--calibrate-steps", type=int, default=200, help="Adam steps per attention module")
    ap.add_argument("--calibrate-lr", type=float, default=1e-2, help="Adam learning rate of the calibration")
    ap.add_argument("--data", help="binarized data for --calibrate (default: the data the checkpoint trained on)")
    args, family_options = ap.parse_known_args(argv)
    if args.out.resolve() == args.softmax.resolve():
        ap.error("OUT must differ from SOFTMAX_CKPT")
    for flag, value in (("--calibrate", args.calibrate), ("--calibrate-steps", args.calibrate_steps)):
        if value < 0 or (flag == "--calibrate-steps" and value < 1):
            ap.error(f"{flag} {value}: must be {'>= 0' if flag == '--calibrate' else '>= 1'}")
    if args.calibrate_lr <= 0:
        ap.error(f"--calibrate-lr {args.calibrate_lr}: must be > 0")
    calibration = dict(batches=args.calibrate, steps=args.calibrate_steps, lr=args.calibrate_lr,
                       data=args.data) if args.calibrate else None
    print(linearize(args.softmax, args.out, args.arch, family_options, calibration))


if __name__ == "__main__":
    main()
