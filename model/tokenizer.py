"""Byte-level BPE tokenizer (HF `tokenizers`), lossless on any UTF-8 text."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

EOT = "<|endoftext|>"
# Chat/SFT turn markers are reserved now so that a pretrained tokenizer needs no resizing later.
SPECIAL_TOKENS = [EOT, "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]


def train_tokenizer(texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> Tokenizer:
    """Train byte-level BPE. No normaliser, so decode(encode(s)) == s for every string."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return tok


def load_tokenizer(path_or_json: str) -> Tokenizer:
    if path_or_json.lstrip().startswith("{"):
        return Tokenizer.from_str(path_or_json)
    return Tokenizer.from_file(path_or_json)


def tokenizer_sha256(tok: Tokenizer) -> str:
    return hashlib.sha256(tok.to_str().encode()).hexdigest()


def encode(tok: Tokenizer, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False).ids


def decode(tok: Tokenizer, ids: list[int]) -> str:
    return tok.decode(ids, skip_special_tokens=False)
