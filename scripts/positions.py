#!/usr/bin/env python
"""Loss by position: where a model's perplexity comes from.

  python scripts/positions.py CHECKPOINT DATA_BIN [--subset valid] [--block 256] --out FILE.json

Language models: the split is read as one token stream, cut into consecutive
blocks of --block tokens (fairseq's --sample-break-mode none, as the LM
configs train), and each block is scored from scratch: position t predicts its
token from the t tokens before it in the block (the first from end-of-sentence
alone), exactly the blocks `fairseq-eval-lm --tokens-per-sample BLOCK
--context-window 0` scores.

Translation models (MT, summarization): every target of the split is scored
teacher-forced, as fairseq-validate scores it; position t is the t-th target
token (the last is end-of-sentence), predicted from the source and the target
tokens before it. --block does not apply.

Writes {"nll": [...], "count": [...]}: the mean negative log-likelihood (nats)
at each position and the number of tokens it averages. A model whose state
forgets (a linear attention's fixed-size memory) falls behind softmax at the
later positions; a model that learns slower falls behind everywhere.
"""
import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
BATCH = 16  # blocks (language models) or sentences (translation) per forward pass


def token_stream(data_bin: Path, subset: str, dictionary) -> torch.Tensor:
    """Every sentence of the split, in order, each ending with end-of-sentence."""
    from fairseq.data import data_utils

    dataset = data_utils.load_indexed_dataset(str(data_bin / subset), dictionary)
    if dataset is None:
        sys.exit(f"[positions] no split {subset!r} in {data_bin}")
    return torch.cat([dataset[i] for i in range(len(dataset))]).long()


def blocks(stream: torch.Tensor, block: int, eos: int):
    """(source, target) pairs: target = the next `block` tokens, source = the
    same shifted right by one (end-of-sentence before the first block)."""
    shifted = torch.cat([stream.new_tensor([eos]), stream[:-1]])
    for start in range(0, len(stream), block):
        yield shifted[start : start + block], stream[start : start + block]


def position_nll(model, stream: torch.Tensor, block: int, eos: int):
    """Summed NLL and token count at each position 0..block-1."""
    total, count = torch.zeros(block, dtype=torch.float64), torch.zeros(block, dtype=torch.long)
    pairs = list(blocks(stream, block, eos))
    full = [p for p in pairs if len(p[1]) == block]
    batches = [full[i : i + BATCH] for i in range(0, len(full), BATCH)] + [[p] for p in pairs if len(p[1]) < block]
    with torch.no_grad():
        for batch in batches:
            src = torch.stack([s for s, _ in batch])
            tgt = torch.stack([t for _, t in batch])
            logits = model(src)[0]
            lprobs = model.get_normalized_probs((logits, None), log_probs=True).double()
            nll = -lprobs.gather(-1, tgt.unsqueeze(-1)).squeeze(-1)
            T = tgt.size(1)
            total[:T] += nll.sum(0)
            count[:T] += tgt.size(0)
    return total, count


def target_position_nll(model, task, subset: str):
    """Summed NLL and token count at each target position, teacher-forced
    (batches of sentences of similar length, padded as fairseq pads them)."""
    task.load_dataset(subset)
    dataset = task.dataset(subset)
    order = dataset.ordered_indices()
    longest = int(dataset.tgt_sizes.max())
    total, count = torch.zeros(longest, dtype=torch.float64), torch.zeros(longest, dtype=torch.long)
    with torch.no_grad():
        for start in range(0, len(order), BATCH):
            sample = dataset.collater([dataset[int(i)] for i in order[start : start + BATCH]])
            lprobs = model.get_normalized_probs(model(**sample["net_input"]), log_probs=True).double()
            target = sample["target"]
            real = target.ne(task.target_dictionary.pad())
            nll = -lprobs.gather(-1, target.unsqueeze(-1)).squeeze(-1) * real
            T = target.size(1)
            total[:T] += nll.sum(0)
            count[:T] += real.sum(0)
    return total, count


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("data_bin", type=Path, help="the binarized data folder (with dict.txt)")
    ap.add_argument("--subset", default="valid")
    ap.add_argument("--block", type=int, default=256, help="language models: tokens per block (the config's tokens_per_sample)")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    if args.block < 1:
        ap.error(f"--block {args.block}: must be a positive number of tokens")
    if not args.checkpoint.is_file():
        ap.error(f"{args.checkpoint}: no such checkpoint")
    sys.path.insert(0, str(ROOT))
    import linear_fairseq  # noqa: F401  registers the models
    from fairseq import checkpoint_utils

    models, _, task = checkpoint_utils.load_model_ensemble_and_task(
        [str(args.checkpoint)], arg_overrides={"data": str(args.data_bin)})
    model = models[0].eval()
    from fairseq.tasks.translation import TranslationTask

    if isinstance(task, TranslationTask):
        total, count = target_position_nll(model, task, args.subset)
    else:
        dictionary = task.target_dictionary
        stream = token_stream(args.data_bin, args.subset, dictionary)
        total, count = position_nll(model, stream, args.block, dictionary.eos())
    nll = [float(s / c) if c else float("nan") for s, c in zip(total, count)]
    args.out.write_text(json.dumps({"nll": nll, "count": count.tolist()}))
    mean = float(total.sum() / count.sum())
    print(f"[positions] {args.subset}: {int(count.sum())} tokens, {len(nll)} positions, mean nll {mean:.4f}")


if __name__ == "__main__":
    main()
