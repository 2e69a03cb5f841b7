"""Read what the fairseq CLIs print and score it (sacrebleu, rouge-score).

Used by the demo, the reproduction scripts and the end-to-end tests, so that
every number in a table comes from the stock CLIs' own output.
"""
import re
from pathlib import Path
from typing import Dict, List

_SPEED = re.compile(
    r"Translated ([\d,]+) sentences \(([\d,]+) tokens\) in ([\d.]+)s "
    r"\(([\d.]+) sentences/s, ([\d.]+) tokens/s\)"
)
_PARAMS = re.compile(r"num\. (?:shared )?model params: ([\d,]+)")
_TRAIN_TIME = re.compile(r"done training in ([\d.]+) seconds")
_PPL = re.compile(r"Loss \(base 2\): ([\d.]+), Perplexity: ([\d.]+)")


def _int(text: str) -> int:
    return int(text.replace(",", ""))


def read_hypotheses(generate_output: str) -> List[str]:
    """The detokenized hypotheses (D- lines; the H- lines without --post-process), in input order."""
    hyps: Dict[int, str] = {}
    fallback: Dict[int, str] = {}
    for line in generate_output.splitlines():
        tag, _, rest = line.partition("-")
        if tag in ("D", "H") and "\t" in rest:
            idx, _score, *text = rest.split("\t")
            if idx.isdigit():
                (hyps if tag == "D" else fallback)[int(idx)] = text[0] if text else ""
    hyps = hyps or fallback
    return [hyps[i] for i in sorted(hyps)]


def read_generate_speed(generate_output: str) -> Dict[str, float]:
    m = _SPEED.search(generate_output)
    if m is None:
        raise ValueError("no 'Translated N sentences ...' line in the fairseq-generate output")
    return {
        "sentences": _int(m.group(1)),
        "tokens": _int(m.group(2)),
        "seconds": float(m.group(3)),
        "sentences_per_s": float(m.group(4)),
        "tokens_per_s": float(m.group(5)),
    }


_VALID = re.compile(r"valid on 'valid' subset .*?\| loss ([\d.]+) .*?\| num_updates (\d+)")


def read_train_log(train_output: str) -> Dict[str, float]:
    """Parameters, training seconds, and from the last validation: its loss and the update count."""
    params, seconds = _PARAMS.search(train_output), _TRAIN_TIME.search(train_output)
    valid = _VALID.findall(train_output)
    return {
        "params": _int(params.group(1)) if params else float("nan"),
        "train_seconds": float(seconds.group(1)) if seconds else float("nan"),
        "valid_loss": float(valid[-1][0]) if valid else float("nan"),
        "updates": int(valid[-1][1]) if valid else 0,
    }


def read_validate_loss(validate_output: str, key: str = "loss") -> float:
    """A loss fairseq-validate reports on the valid subset (base 2): `loss`, the
    criterion's, or `nll_loss`, without label smoothing."""
    m = re.search(r"valid on 'valid' subset \|.*? " + key + r" ([\d.]+)", validate_output)
    if m is None:
        raise ValueError(f"no \"valid on 'valid' subset | ... {key} ...\" line in the fairseq-validate output")
    return float(m.group(1))


def read_perplexity(eval_lm_output: str) -> float:
    m = _PPL.search(eval_lm_output)
    if m is None:
        raise ValueError("no 'Loss (base 2): ..., Perplexity: ...' line in the fairseq-eval-lm output")
    return float(m.group(2))


def bleu_chrf(hypotheses: List[str], references: List[str]) -> Dict[str, float]:
    import sacrebleu

    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses for {len(references)} references")
    return {
        "bleu": sacrebleu.corpus_bleu(hypotheses, [references]).score,
        "chrf": sacrebleu.corpus_chrf(hypotheses, [references]).score,
    }


def read_references(path: Path) -> List[str]:
    return Path(path).read_text(encoding="utf-8").splitlines()


_EVAL_SPEED = re.compile(r"Evaluated ([\d,]+) tokens in ([\d.]+)s \(([\d.]+) tokens/s\)")


def read_eval_lm_speed(eval_lm_output: str) -> Dict[str, float]:
    m = _EVAL_SPEED.search(eval_lm_output)
    if m is None:
        raise ValueError("no 'Evaluated N tokens in ...' line in the fairseq-eval-lm output")
    return {"tokens": _int(m.group(1)), "seconds": float(m.group(2)), "tokens_per_s": float(m.group(3))}


def rouge(hypotheses: List[str], references: List[str]) -> Dict[str, float]:
    """Mean ROUGE-1/2/L F1 (x100) with Porter stemming (rouge-score)."""
    from rouge_score import rouge_scorer

    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses for {len(references)} references")
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    totals = {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    for hyp, ref in zip(hypotheses, references):
        for key, score in scorer.score(ref, hyp).items():
            totals[key] += score.fmeasure
    n = max(len(references), 1)
    return {"r1": 100 * totals["rouge1"] / n, "r2": 100 * totals["rouge2"] / n, "rl": 100 * totals["rougeL"] / n}


def lead_baselines(documents: List[str], references: List[str], words: int = 30) -> Dict[str, Dict[str, float]]:
    """ROUGE of two extractive summaries that need no training: each document's
    first sentence ("lead-1") and its first `words` words."""
    first = [re.split(r"(?<=[.!?])\s", doc.strip(), maxsplit=1)[0] for doc in documents]
    opening = [" ".join(doc.split()[:words]) for doc in documents]
    return {"lead-1": rouge(first, references), f"first {words} words": rouge(opening, references)}
