"""``lsnn eval``: a checkpoint's loss, perplexity and accuracy beside the unigram baselines.

By default on the run's own validation split: its prepared corpus, found from its
config.json (the cache entry or prepared directory it trained on, or the same source
prepared again with the run's saved tokenizer, so the same documents as in training);
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
from stability.config import ConfigError, TrainConfig
from stability.data import DataError, Document, TokenBatches, TokenSource, unigram_loss
from stability.shards import PreparedCorpus, baselines, is_prepared, load_prepared, open_prepared
from stability.sources import TextFile, decode, open_source, read_bytes
from stability.stream import _mode_accuracy
from stability.tokenizers import encode_documents, tokenizer_spec
from stability.trainer import next_token_sums


def eval_documents(path: str | Path, data_format: str = "auto", text_field: str = "text") -> list[Document]:
    """Every document under ``path``, none held out: ``--data`` of ``lsnn eval`` is all
    evaluation text. Same reading rules as training's ``--data`` (hidden names ignored;
    binary, non-UTF-8 and empty files skipped), except that a single text file is one
    document, not cut into segments."""
    source = open_source(path, data_format, text_field)
    if isinstance(source, TextFile):
        data = read_bytes(source.root, source.what)
        text = decode(data)
        if text is None:
            raise DataError(f"{source.what}: the file is binary or not UTF-8 text; pass a UTF-8 text file")
        if not text.strip():
            raise DataError(f"{source.what}: the file is empty; pass a file with text in it")
        return [Document(source.root.name, text)]
    docs = [Document(d.name, d.text, d.domain) for _, unit in source.scan() for d in unit]
    if not docs:
        source.finish(0)
    return docs


def validation_split(art: RunArtifacts) -> tuple[PreparedCorpus, str, bool]:
    """The run's prepared corpus, found (or prepared again) from its config.json with the
    run's own tokenizer; (corpus, name, same corpus as in training: equal fingerprints)."""
    try:
        t = TrainConfig.from_dict({**art.config.get("train", {}), "resume": False, "overwrite": False})
        corpus = load_prepared(t)
        if tokenizer_spec(corpus.tokenizer) != tokenizer_spec(art.tokenizer):
            corpus = load_prepared(t, tokenizer=art.tokenizer)
    except (ConfigError, DataError) as e:
        raise ArtifactError(f"rebuilding the run's validation split from its config.json: {e}; "
                            "or pass --data PATH to evaluate on other text") from e
    if tokenizer_spec(corpus.tokenizer) != tokenizer_spec(art.tokenizer):
        raise ArtifactError(f"{corpus.path} was prepared with another tokenizer than the run's "
                            f"{art.run_dir / 'tokenizer.json'}; pass --data PATH to evaluate on other text")
    return corpus, f"validation split of {corpus.name}", corpus.fingerprint() == art.config.get("corpus")


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
    tokens: TokenSource | torch.Tensor
    if data is None:
        corpus, name, same = validation_split(art)
        tokens, documents = corpus.splits["val"].tokens, corpus.manifest["splits"]["val"]["documents"]
        unigram, unigram_acc = baselines(tokens, art.tokenizer.vocab_size)
    elif is_prepared(data):
        corpus = open_prepared(data, f"prepare it again (lsnn prepare SOURCE {data}, into an empty directory)")
        if tokenizer_spec(corpus.tokenizer) != tokenizer_spec(art.tokenizer):
            raise ArtifactError(f"--data {data}: prepared with another tokenizer than the run's "
                                f"{art.run_dir / 'tokenizer.json'}; prepare the text with the run's flags")
        tokens, documents = corpus.splits["val"].tokens, corpus.manifest["splits"]["val"]["documents"]
        name, same = f"validation split of --data {data}", True
        unigram, unigram_acc = baselines(tokens, art.tokenizer.vocab_size)
    else:
        docs = eval_documents(data)
        name, same, documents = f"--data {data}", True, len(docs)
        tokens = encode_documents(art.tokenizer, docs)  # n
        unigram, unigram_acc = unigram_loss(tokens, art.tokenizer.vocab_size), _mode_accuracy(tokens)
    batches = TokenBatches(tokens, int(t.get("batch_size", 4)), int(t.get("sequence_length", 64)),
                           shuffle=False, pad_id=art.tokenizer.pad_id)
    limit = eval_batches if eval_batches is not None else t.get("eval_batches")
    metrics = evaluate(art.model.to(device), spread(batches, limit), device)
    result = {
        "run_dir": str(art.run_dir), "checkpoint": str(art.checkpoint), "step": art.step, "data": name,
        "documents": documents, "batches": min(limit or len(batches), len(batches)), **metrics,
        "unigram_loss": unigram, "unigram_acc": unigram_acc,
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
