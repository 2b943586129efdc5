"""lsnn sample: streaming decode, token picking, generation against a full-forward oracle."""

import io

import pytest
import torch

from stability.sampling import SampleError, StreamDecoder, check_sampling, generate, pick
from stability.tokenizers import BPETokenizer, ByteTokenizer, train_bpe
from tests.tiny import tiny_hybrid

MULTIBYTE = "a é € 😀 ü\n"  # 1-, 2-, 3- and 4-byte characters


def _pieces(decoder: StreamDecoder, ids: list[int]) -> list[str]:
    return [decoder.push(i) for i in ids] + [decoder.flush()]


def test_byte_stream_never_prints_half_a_character():
    tok = ByteTokenizer()
    pieces = _pieces(StreamDecoder(tok), tok.encode(MULTIBYTE))
    assert "".join(pieces) == MULTIBYTE
    assert not any("\ufffd" in p for p in pieces)
    euro = tok.encode("€")
    decoder = StreamDecoder(tok)
    assert [decoder.push(i) for i in euro] == ["", "", "€"], "held back until the character completes"


def test_byte_stream_prints_invalid_utf8_after_at_most_four_bytes():
    tok = ByteTokenizer()
    decoder = StreamDecoder(tok)
    out = [decoder.push(i) for i in [0xFF, 0xFF, 0xFF, 0xFF, ord("a")]]
    assert out[:3] == ["", "", ""] and "\ufffd" in out[3], "an invalid sequence cannot stall the stream"
    assert out[4] == "a"


def test_bpe_stream_concatenates_to_the_whole_decode():
    tok = BPETokenizer(train_bpe([MULTIBYTE * 3, "plain text here"], 270), path=None, from_cache=False)
    ids = tok.encode(MULTIBYTE * 2)
    pieces = _pieces(StreamDecoder(tok), ids)
    assert "".join(pieces) == tok.decode(ids) == MULTIBYTE * 2
    assert not any("\ufffd" in p for p in pieces)


def test_pick_is_greedy_at_temperature_zero_and_within_top_k():
    logits = torch.tensor([0.1, 3.0, 2.9, -1.0, 2.8])
    g = torch.Generator().manual_seed(0)
    assert pick(logits, 0.0, 0, g) == 1
    assert pick(logits, 5.0, 1, g) == 1, "top-k 1 is greedy at any temperature"
    draws = {pick(logits, 100.0, 3, g) for _ in range(300)}
    assert draws == {1, 2, 4}, "a hot softmax reaches every token of the top 3 and nothing else"
    assert {pick(logits, 100.0, 0, g) for _ in range(300)} == set(range(5))


def test_pick_repeats_under_a_seed():
    logits = torch.randn(50, generator=torch.Generator().manual_seed(3))
    def draws(seed):
        g = torch.Generator().manual_seed(seed)
        return [pick(logits, 1.0, 10, g) for _ in range(40)]

    assert draws(7) == draws(7)
    assert draws(7) != draws(8)


@pytest.mark.parametrize("kwargs,flag", [(dict(max_new_tokens=0), "--max-new-tokens"),
                                         (dict(temperature=-1.0), "--temperature"),
                                         (dict(temperature=float("nan")), "--temperature"),
                                         (dict(top_k=-2), "--top-k")])
def test_bad_sampling_flags_are_named(kwargs, flag):
    with pytest.raises(SampleError, match=flag):
        check_sampling(**{**dict(max_new_tokens=5, temperature=1.0, top_k=0), **kwargs})


class Recorder(io.StringIO):
    """Counts flushes: streaming means one flush per printed piece."""

    def __init__(self):
        super().__init__()
        self.flushes = 0

    def flush(self):
        self.flushes += 1
        super().flush()


def _byte_model(**kw):
    return tiny_hybrid(vocab_size=256, use_mamba=True, **kw).eval()


def test_greedy_generation_equals_the_full_forward_at_every_step():
    model, tok = _byte_model(), ByteTokenizer()
    prompt = "def f(x):"
    new = generate(model, tok, prompt, 12, temperature=0.0)
    ids = tok.encode(prompt)
    with torch.no_grad():  # the oracle: the whole text through the forward, one token at a time
        for expected in new:
            assert int(model(torch.tensor([ids]))[0, -1].argmax()) == expected
            ids.append(expected)
    assert len(new) == 12


def test_generation_streams_the_prompt_then_each_piece():
    model, tok = _byte_model(), ByteTokenizer()
    out = Recorder()
    new = generate(model, tok, "ab", 10, temperature=1.0, top_k=0, seed=1, out=out)
    assert out.getvalue() == "ab" + tok.decode(new) + "\n"
    assert out.flushes >= 1 + sum(1 for i in new if i < 128), "every complete character is flushed at once"


def test_a_seed_repeats_its_text_and_another_seed_changes_it():
    model, tok = _byte_model(), ByteTokenizer()
    a, b = (generate(model, tok, "x = ", 20, temperature=1.0, top_k=50, seed=5) for _ in range(2))
    c = generate(model, tok, "x = ", 20, temperature=1.0, top_k=50, seed=6)
    assert a == b
    assert a != c


def test_generation_stops_at_the_end_of_document_token():
    # an untied head starts at zero: every logit is 0, so greedy picks id 0, the byte tokenizer's eos
    model, tok = _byte_model(tie_embeddings=False), ByteTokenizer()
    out = io.StringIO()
    assert generate(model, tok, "hello", 30, temperature=0.0, out=out) == []
    assert out.getvalue() == "hello\n"
