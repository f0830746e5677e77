"""Byte-level BPE: lossless on any Unicode text, special tokens reserved."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from model.tokenizer import EOT, SPECIAL_TOKENS, decode, encode, load_tokenizer, train_tokenizer

CORPUS = ["To be, or not to be, that is the question:\n", "Whether 'tis nobler in the mind to suffer\n"] * 50


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(CORPUS, vocab_size=400)


@settings(max_examples=300, deadline=None)
@given(text=st.text())
def test_round_trips_arbitrary_unicode(tok, text):
    assert decode(tok, encode(tok, text)) == text


@pytest.mark.parametrize("text", ["", " ", "\n\n\t", "naïve café 東京 🤖🏳️‍🌈", "\x00\x01\ufeff", "a" * 5000,
                                  f"text {EOT} more <|user|>hi<|end|>"])
def test_round_trips_edge_cases(tok, text):
    assert decode(tok, encode(tok, text)) == text


def test_special_tokens_are_single_ids_and_vocab_size(tok, tmp_path):
    assert 256 + len(SPECIAL_TOKENS) < tok.get_vocab_size() <= 400  # small corpus: merges run out
    for i, t in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(t) == i
        assert encode(tok, t) == [i]
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    again = load_tokenizer(str(path))
    assert encode(again, CORPUS[0]) == encode(tok, CORPUS[0])
    assert len(encode(tok, CORPUS[0])) < len(CORPUS[0]) / 2  # it learned merges
