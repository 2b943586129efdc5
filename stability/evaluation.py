"""``lsnn eval``: a checkpoint's loss, perplexity and accuracy beside the unigram baselines.

By default on the run's own validation split, rebuilt from its config.json (the same
corpus, --val-fraction and the saved tokenizer, so the same documents as in training);
with ``--data PATH`` on all the text of a file or directory. Windows and batches are the
run's --sequence-length and --batch-size; ``--eval-batches N`` spreads N batches evenly
over the split, as the run's own validation does. The model runs in fp32.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from model import HybridLM
from stability.artifacts import ArtifactError, RunArtifacts
from stability.data import (
    DEFAULT_VAL_FRACTION,
    DataError,
    Document,
    TokenBatches,
    _decode,
    _read,
    _walk_texts,
    load_corpus,
    unigram_loss,
)
from stability.stream import _mode_accuracy
from stability.tokenizers import encode_documents
from stability.trainer import next_token_sums


def eval_documents(path: str | Path) -> list[Document]:
    """Every text file under ``path`` (or the file itself), none held out: ``--data`` of
    ``lsnn eval`` is all evaluation text. Same reading rules as training's ``--data``
    (hidden names ignored; binary, non-UTF-8 and empty files skipped)."""
    root, what = Path(path), f"--data {path}"
    if not root.exists():
        raise DataError(f"{what}: no such file or directory; pass a text file or a directory of text files")
    if root.is_dir():
        texts, skipped = _walk_texts(root, lambda d: True, lambda f: True, what)
        if not texts:
            raise DataError(f"{what}: no text files in the directory ({skipped} skipped as binary, not UTF-8 or "
                            "empty); pass UTF-8 text")
        return [Document(p, t) for p, t in texts.items()]
    text = _decode(_read(root, what))
    if text is None:
        raise DataError(f"{what}: the file is binary or not UTF-8 text; pass a UTF-8 text file")
    if not text.strip():
        raise DataError(f"{what}: the file is empty; pass a file with text in it")
    return [Document(root.name, text)]


def validation_documents(config: dict[str, Any]) -> tuple[list[Document], str, bool]:
    """The run's validation documents from its config.json; (docs, name, same corpus as in
    training: the fingerprint of the text read now equals the run's)."""
    t = config.get("train", {})
    try:
        corpus = load_corpus(t.get("data"), t.get("dataset"), t.get("val_fraction", DEFAULT_VAL_FRACTION))
    except DataError as e:
        raise ArtifactError(f"rebuilding the run's validation split from its config.json: {e}; "
                            "or pass --data PATH to evaluate on other text") from e
    return corpus.val, f"validation split of {corpus.name}", corpus.fingerprint() == config.get("corpus")


def spread(batches: TokenBatches, limit: int | None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """All batches, or ``limit`` of them spread evenly over the split (as the run validates)."""
    n = len(batches)
    count = min(limit or n, n)
    for i in range(count):
        yield batches.get(0, i * n // count)


@torch.no_grad()
def evaluate(model: HybridLM, batches, device: torch.device | str = "cpu") -> dict[str, float]:
    """Mean next-token loss (nats), perplexity and accuracy over ``batches``, pads ignored;
    the same sums as ``Trainer.evaluate``."""
    total, correct, count = 0.0, 0, 0
    for x, y in batches:
        batch_total, batch_hits, batch_count = next_token_sums(model, x.to(device), y.to(device))
        total += float(batch_total)  # host sync per batch: evaluation, not the training loop
        correct += int(batch_hits)
        count += int(batch_count)
    if count == 0:
        raise DataError("the evaluation text has no token to predict; give more text")
    loss = total / count
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "accuracy": correct / count, "tokens": count}


def evaluate_run(art: RunArtifacts, data: str | Path | None = None, eval_batches: int | None = None,
                 device: torch.device | str = "cpu") -> dict[str, Any]:
    """``lsnn eval``'s result: the metrics, the baselines and what they were measured on."""
    if eval_batches is not None and eval_batches < 1:
        raise DataError(f"--eval-batches must be a positive integer, got {eval_batches}")
    t = art.config.get("train", {})
    if data is None:
        docs, name, same = validation_documents(art.config)
    else:
        docs, name, same = eval_documents(data), f"--data {data}", True
    tokens = encode_documents(art.tokenizer, docs)  # n
    batches = TokenBatches(tokens, int(t.get("batch_size", 4)), int(t.get("sequence_length", 64)),
                           shuffle=False, pad_id=art.tokenizer.pad_id)
    limit = eval_batches if eval_batches is not None else t.get("eval_batches")
    metrics = evaluate(art.model.to(device), spread(batches, limit), device)
    result = {
        "run_dir": str(art.run_dir), "checkpoint": str(art.checkpoint), "step": art.step, "data": name,
        "documents": len(docs), "batches": min(limit or len(batches), len(batches)), **metrics,
        "unigram_loss": unigram_loss(tokens, art.tokenizer.vocab_size), "unigram_acc": _mode_accuracy(tokens),
    }
    if not same:
        result["warning"] = ("the corpus differs from the one the run trained on (its fingerprint changed): "
                             "this split is rebuilt from today's files")
    return result


def format_result(result: dict[str, Any]) -> list[str]:
    """The result as a few lines for a terminal."""
    lines = [f"{result['checkpoint']} (step {result['step']}) on {result['data']}: {result['documents']} documents, "
             f"{result['tokens']} tokens in {result['batches']} batches",
             f"  loss {result['loss']:.4f}  perplexity {result['perplexity']:.2f}  accuracy {result['accuracy']:.4f}",
             f"  unigram baseline: loss {result['unigram_loss']:.4f}  accuracy {result['unigram_acc']:.4f}"]
    if "warning" in result:
        lines.append(f"  warning: {result['warning']}")
    return lines
