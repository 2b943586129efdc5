"""``lsnn sample``: text from a trained model, streamed as it is generated.

The prompt runs through the model once (``HybridLM.prefill``); every new token then costs
one recurrent step (``HybridLM.step``), not a forward over the whole text. Temperature 0 is
greedy; otherwise the next token is drawn from the softmax of logits / temperature over the
``top_k`` most likely tokens, with a generator seeded by ``--seed``, so a seed repeats its
text exactly. Generation stops early at the end-of-document token.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TextIO

import torch

from model import HybridLM
from stability.tokenizers import Tokenizer

# A UTF-8 character has at most 4 bytes and every token decodes to at least one byte, so a
# piece still incomplete after 4 tokens is invalid UTF-8: it is printed (as U+FFFD).
_MAX_PENDING = 4
_REPLACEMENT = "\ufffd"


class SampleError(ValueError):
    """A bad sampling flag; the message names it."""


def check_sampling(max_new_tokens: int, temperature: float, top_k: int) -> None:
    """Every problem with the sampling flags, in one SampleError."""
    problems = []
    if max_new_tokens < 1:
        problems.append(f"--max-new-tokens must be a positive integer, got {max_new_tokens}")
    if not (math.isfinite(temperature) and temperature >= 0):
        problems.append(f"--temperature must be a finite number >= 0 (0: greedy), got {temperature}")
    if top_k < 0:
        problems.append(f"--top-k must be >= 0 (0: no cut-off), got {top_k}")
    if problems:
        raise SampleError("; ".join(problems))


class StreamDecoder:
    """The text of a token stream, piece by piece, never ending mid-character: a token that
    ends inside a multi-byte UTF-8 character is held back until the character completes.

    Pieces decode independently because each one ends on a character boundary, where
    byte-level tokenizers (bytes, byte-level BPE, tiktoken) decode by concatenation.
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.pending: list[int] = []

    def push(self, token: int) -> str:
        """The text that ``token`` completes ("" while a character is incomplete)."""
        self.pending.append(token)
        text = self.tokenizer.decode(self.pending)
        if text.endswith(_REPLACEMENT) and len(self.pending) < _MAX_PENDING:
            return ""
        self.pending = []
        return text

    def flush(self) -> str:
        """Whatever is held back, at the end of the stream."""
        text = self.tokenizer.decode(self.pending) if self.pending else ""
        self.pending = []
        return text


def pick(logits: torch.Tensor, temperature: float, top_k: int, generator: torch.Generator) -> int:
    """The next token from logits (v,): argmax at temperature 0, else a draw from
    softmax(logits / temperature) restricted to the ``top_k`` largest (0: all; ties kept)."""
    if temperature == 0:
        return int(logits.argmax())
    scaled = logits.float().cpu() / temperature  # on the CPU: the same seed gives the same text anywhere
    if 0 < top_k < scaled.numel():
        kth = scaled.topk(top_k).values[-1]
        scaled = scaled.masked_fill(scaled < kth, -math.inf)
    return int(torch.multinomial(scaled.softmax(-1), 1, generator=generator))


@torch.no_grad()
def generate(
    model: HybridLM,
    tokenizer: Tokenizer,
    prompt: str,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int = 0,
    seed: int = 0,
    out: TextIO | None = None,
) -> list[int]:
    """Continue ``prompt`` by up to ``max_new_tokens`` tokens; returns them. With ``out``,
    writes the prompt and then each new piece of text as soon as it is complete (flushed
    per token). An empty prompt starts a new document (after the end-of-document token)."""
    check_sampling(max_new_tokens, temperature, top_k)
    device = next(model.parameters()).device
    ids: Sequence[int] = tokenizer.encode(prompt) or [tokenizer.eos_id]
    generator = torch.Generator().manual_seed(seed)
    logits, state = model.prefill(torch.tensor([list(ids)], device=device))
    logits = logits[0, -1]  # v
    decoder = StreamDecoder(tokenizer)
    _write(out, prompt)
    new: list[int] = []
    while True:
        token = pick(logits, temperature, top_k, generator)
        if token == tokenizer.eos_id:
            break
        new.append(token)
        _write(out, decoder.push(token))
        if len(new) == max_new_tokens:
            break
        logits = model.step(torch.tensor([token], device=device), state)[0]  # v
    _write(out, decoder.flush() + "\n")
    return new


def _write(out: TextIO | None, text: str) -> None:
    if out is not None and text:
        out.write(text)
        out.flush()
