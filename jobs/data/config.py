"""Configs of the data jobs: prepare (with its clean and dedup sections) and tasks.

Plain pydantic: importable without torch or Ray (the control API validates specs with them).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from jobs.config import JobConfig, Section


class CleanConfig(Section):
    """HTML extraction, normalisation and the Gopher/C4 quality filters."""

    html_extractor: Literal["resiliparse", "trafilatura"] = "resiliparse"
    """`resiliparse` (fast, ~10x: main-content heuristics in C++) or `trafilatura` (slower, more precise)."""
    min_words: int = Field(50, ge=0)
    """Drop documents with fewer whitespace-separated words."""
    max_words: int = Field(100_000, gt=0)
    """Drop documents with more words."""
    min_mean_word_length: float = Field(3.0, ge=0)
    """Drop documents whose mean word length (characters) is below this."""
    max_mean_word_length: float = Field(10.0, gt=0)
    """Drop documents whose mean word length is above this."""
    max_symbol_word_ratio: float = Field(0.1, ge=0)
    """Drop documents with more `#` and ellipses (`...`, `…`) per word."""
    max_ellipsis_line_fraction: float = Field(0.3, ge=0, le=1)
    """Drop documents with a larger fraction of lines ending in an ellipsis."""
    max_bullet_line_fraction: float = Field(0.9, ge=0, le=1)
    """Drop documents with a larger fraction of lines starting with a bullet."""
    max_duplicate_line_fraction: float = Field(0.3, ge=0, le=1)
    """Drop documents where a larger fraction of the non-empty lines repeat an earlier line."""
    max_duplicate_line_char_fraction: float = Field(0.2, ge=0, le=1)
    """Drop documents where repeated lines hold a larger fraction of the characters."""
    max_top_ngram_fraction: dict[int, float] = {2: 0.20, 3: 0.18, 4: 0.16}
    """n -> the largest fraction of word characters the most frequent word n-gram may cover."""
    max_duplicate_ngram_fraction: dict[int, float] = {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10}
    """n -> the largest fraction of word characters that word n-grams occurring more than once may cover."""
    languages: list[str] | None = None
    """Keep only these ISO 639-1 languages (e.g. [en, de]), detected by py3langid. None: no language filter."""
    min_language_score: float = Field(0.5, ge=0, le=1)
    """Drop documents whose detected language's probability is below this (with `languages` set)."""

class DedupConfig(Section):
    """Exact and MinHash-LSH near-duplicate removal."""

    exact: bool = True
    """Keep one copy of documents whose normalised text is identical."""
    fuzzy: bool = True
    """Remove near-duplicates found by MinHash LSH, keeping one document per connected component."""
    num_perm: int = Field(128, ge=8, le=4096)
    """MinHash permutations (signature length)."""
    ngram: int = Field(5, ge=1)
    """Words per shingle (lower-cased `\\w+` words)."""
    threshold: float = Field(0.8, gt=0.0, lt=1.0)
    """Jaccard similarity of shingle sets above which two documents are near-duplicates."""
    verify: bool = True
    """Keep a candidate pair only if its signature Jaccard reaches the threshold (cuts LSH false positives)."""
    seed: int = 1
    """Seed of datasketch's permutation parameters."""

    @model_validator(mode="after")
    def _fits(self):
        bands, rows = lsh_params(self.threshold, self.num_perm)
        if bands * rows > self.num_perm:  # datasketch guarantees this; a guard against its changes
            raise ValueError(f"num_perm {self.num_perm} too small for threshold {self.threshold}")
        return self

def lsh_params(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows) minimising the false-positive plus false-negative area (datasketch)."""
    from datasketch.lsh import _optimal_param

    return _optimal_param(threshold, num_perm, 0.5, 0.5)

class PrepareConfig(JobConfig):
    """Turn a raw text corpus into a tokenizer and packed token shards."""

    kind: Literal["prepare"] = "prepare"
    inputs: list[str] = Field(default_factory=list)
    """Files, directories, globs or s3:// prefixes. Empty: the embedded Shakespeare corpus."""
    format: Literal["auto", "text", "markdown", "jsonl", "parquet", "html", "warc"] = "auto"
    """Input format; `auto` decides by file extension (.txt .md .jsonl/.json .parquet .html .warc, each optionally .gz/.zst)."""
    text_field: str = "text"
    """Field (JSONL/JSON) or column (Parquet) that holds the document text."""
    max_document_bytes: int = Field(10_000_000, gt=0)
    """Reject (reason `too_large`) any single document larger than this many bytes, before decoding it."""
    max_replacement_fraction: float = Field(0.01, ge=0, le=1)
    """Reject (reason `undecodable`) non-UTF-8 input whose detected encoding still leaves more U+FFFD than this fraction."""
    clean: CleanConfig = CleanConfig()
    """HTML extraction, normalisation, quality and language filters."""
    # a factory, not an instance: validating one at import would import datasketch's LSH and scipy
    # (~1.3 s) in every Ray worker that unpickles a UDF of this module
    dedup: DedupConfig = Field(default_factory=DedupConfig)
    """Exact and MinHash-LSH near-duplicate removal."""
    markdown_split_level: int | None = None
    """Split each Markdown file into one document per heading of this level (e.g. 3 = `###`)."""
    output: str
    """Directory or s3:// prefix that receives the tokenizer, the shards and the manifest."""
    tokenizer: str | None = None
    """Reuse this tokenizer.json instead of training one."""
    vocab_size: int = Field(32000, ge=256 + 6, le=2**32 - 1)
    """BPE vocabulary size, special tokens included."""
    tokenizer_sample_bytes: int = Field(100_000_000, gt=0)
    """Train the tokenizer on a deterministic sample of about this many bytes of text."""
    seq_len: int = Field(1024, gt=1)
    """Tokens per training sequence; shards store seq_len + 1 tokens per row (inputs and shifted targets)."""
    val_fraction: float = Field(0.005, ge=0.0, lt=1.0)
    """Fraction of documents (chosen by hash of their text) held out for validation."""
    num_shards: int = Field(4, gt=0)
    """Train shards to write (validation gets max(1, num_shards // 8)). Size them to a few hundred MB."""
    seed: int = 0
    """Salt of the document hash that drives the split and shard assignment."""

    @field_validator("inputs")
    @classmethod
    def _no_empty_paths(cls, v):
        for i, p in enumerate(v):
            if not p.strip():
                raise ValueError(f"inputs[{i}] is empty")
        return v

class VerifiableConfig(Section):
    """Verifiable tasks (jobs.data.verifiable): answers a rule checks, for RL with verifiable rewards."""

    tasks: list[Literal["addition", "reverse", "first_word"]] = Field(min_length=1)
    """`addition` ("What is 37+58?", numeric answer), `reverse` ("Reverse the letters: k m q z", exact match),
    `first_word` ("First word of: king moon sword" -> "king", exact match; its SFT replies are a random
    word of the prompt: the format, not the rule, so RL has headroom). 6840 distinct first_word prompts."""
    eval_items: int = Field(500, ge=1)
    """Held-out items per task (eval/<task>.jsonl and rl_eval.jsonl); no training item shares their operands or letters."""
    sft_items: int = Field(1000, ge=1)
    """SFT conversations per task (verifiable_sft_train.jsonl): the warm start before RL."""
    rl_items: int = Field(3000, ge=1)
    """RL training prompts per task (rl_train.jsonl), disjoint from the SFT and held-out items."""
    addition_digits: int = Field(2, ge=1, le=9)
    """Each addition operand has 1 to this many digits."""
    seed: int = 0
    """Seeds the items: the same seed writes the same files."""

    @field_validator("tasks")
    @classmethod
    def _distinct(cls, v):
        if len(set(v)) != len(v):
            raise ValueError("a task is listed twice")
        return v


class TasksConfig(JobConfig):
    """Build instruction data, preference pairs and held-out eval tasks from the plays, and verifiable tasks."""

    kind: Literal["tasks"] = "tasks"
    data: str | None = None
    """Output of jobs.prepare: its manifest says which corpus, Markdown split level, seed and val_fraction define the
    held-out documents. Unset: no Shakespeare tasks, only the `verifiable` ones."""
    output: str
    """Directory or s3:// prefix for the JSONL files."""
    train_items_per_kind: int = Field(3000, ge=1)
    """Most SFT conversations (and preference pairs) per item kind, from training documents."""
    eval_items_per_kind: int = Field(200, ge=1)
    """Most held-out items per kind, from the held-out documents."""
    context_speeches: int = Field(3, ge=1)
    """Speeches shown before a speaker question (each cut to its last `lines_per_speech` lines)."""
    lines_per_speech: int = Field(2, ge=1)
    """Lines kept from each speech shown as context."""
    max_prompt_chars: int = Field(300, ge=50)
    """Skip items whose prompt is longer (keeps conversations inside a small model's context)."""
    seed: int = 0
    """Seeds the sampling of items and of wrong choices."""
    verifiable: VerifiableConfig | None = None
    """Also write verifiable tasks (RL prompts with answers, their held-out items and SFT warm-start conversations)."""

    @model_validator(mode="after")
    def _something(self):
        if self.data is None and self.verifiable is None:
            raise ValueError("nothing to build: set data (Shakespeare tasks) and/or verifiable")
        return self
