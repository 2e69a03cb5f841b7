"""Let fairseq checkpoints load under torch >= 2.6 (``torch.load(weights_only=True)``).

Checkpoints of dataclass-configured models (every linear_fairseq model) hold
only tensors and plain containers and load as they are. Checkpoints of
fairseq's argparse-configured models, such as the softmax ``transformer``
baselines this project compares against, also pickle an ``argparse.Namespace``.
A Namespace is a plain attribute bag that runs no code when unpickled, so it is
added to torch's allow-list; nothing else is, and nothing in fairseq is patched.
"""
import argparse

import torch

SAFE_GLOBALS = [argparse.Namespace]


def allow_fairseq_checkpoints() -> None:
    add = getattr(torch.serialization, "add_safe_globals", None)
    if add is not None:  # torch < 2.4 has no allow-list and loads everything
        add(SAFE_GLOBALS)


def _examples(names, n: int = 3) -> str:
    names = sorted(names)
    return ", ".join(names[:n]) + (f", ... ({len(names)} in all)" if len(names) > n else "")


def checkpoint_mismatch(model, state_dict) -> str:
    """Why `state_dict` does not load into `model`, in words: vocabulary, shapes, names."""
    mine = model.state_dict()
    reasons = []
    shapes = {k: (tuple(v.shape), tuple(mine[k].shape)) for k, v in state_dict.items()
              if k in mine and hasattr(v, "shape") and tuple(v.shape) != tuple(mine[k].shape)}
    vocab = [k for k in shapes if k.endswith(("embed_tokens.weight", "output_projection.weight"))
             and shapes[k][0][0] != shapes[k][1][0]]  # rows differ: the vocabulary (columns: the model width)
    if vocab:
        (theirs, ours) = shapes[vocab[0]]
        reasons.append(
            f"the checkpoint's vocabulary has {theirs[0]} entries, this task's dictionary {ours[0]} "
            f"({vocab[0]}): use the data-bin (dictionary) the model was trained with"
        )
    other = {k: v for k, v in shapes.items() if k not in vocab}
    if other:
        k = sorted(other)[0]
        reasons.append(f"{len(other)} tensors differ in shape, e.g. {k}: {list(other[k][0])} in the checkpoint, "
                       f"{list(other[k][1])} here (other model sizes or options)")
    missing, unexpected = set(mine) - set(state_dict), set(state_dict) - set(mine)
    if missing or unexpected:
        reasons.append(
            f"the checkpoint lacks {len(missing)} entries this {type(model).__name__} has"
            + (f" ({_examples(missing)})" if missing else "")
            + f" and has {len(unexpected)} it does not" + (f" ({_examples(unexpected)})" if unexpected else "")
            + ": it was trained with another architecture or attention"
        )
    return "; ".join(reasons) or "the checkpoint's tensors do not match this model"
