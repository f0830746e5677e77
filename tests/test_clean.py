"""Cleaning: every quality filter on hand-made documents, normalisation, HTML extraction, language."""

from __future__ import annotations

import random

import pytest

from jobs.data.clean import _FTFY, CleanConfig, clean_batch, clean_one, extract_html, fix_mojibake, normalize, quality_reason

CFG = CleanConfig()
VOCAB = ["river", "stone", "garden", "window", "little", "morning", "silver", "quiet", "people", "travel",
         "history", "market", "summer", "number", "friend", "letter", "orange", "mountain", "between", "always"]


def prose(n_words: int, seed: int = 0) -> str:
    r = random.Random(seed)
    words = [r.choice(VOCAB) + r.choice(["", "s", "ed", "ing"]) for _ in range(n_words)]
    lines = [" ".join(words[i:i + 12]) + "." for i in range(0, n_words, 12)]
    return "\n".join(lines) + "\n"


def test_good_prose_passes():
    assert quality_reason(prose(200), CFG) == ""


@pytest.mark.parametrize("text,reason", [
    ("only a few words here.\n", "too_few_words"),
    (prose(2000), "too_many_words"),
    (" ".join(["a b c d"] * 30), "mean_word_length"),
    (" ".join(["incomprehensibilities"] * 3 + ["internationalisation"] * 60), "mean_word_length"),
    (prose(100) + " #tag" * 20, "symbol_word_ratio"),
    ("\n".join(f"{prose(24, i).strip()} ..." for i in range(12)), "ellipsis_lines"),
    ("\n".join(f"• {prose(10, i).strip()}" for i in range(12)), "bullet_lines"),
    ("\n".join(["the same line of text repeated here again"] * 8 + [prose(12, i).strip() for i in range(4)]),
     "duplicate_lines"),
])
def test_each_filter_drops_its_case(text, reason):
    cfg = CleanConfig(max_words=1000) if reason == "too_many_words" else CFG
    assert quality_reason(text, cfg) == reason


def test_duplicate_line_chars_and_ngram_filters():
    long_line = "a long line that repeats itself with many characters in every single copy"
    lines = [prose(12, i).strip() for i in range(12)] + [long_line] * 8
    assert quality_reason("\n".join(lines), CleanConfig(
        max_duplicate_line_fraction=1.0, max_top_ngram_fraction={}, max_duplicate_ngram_fraction={})) == "duplicate_line_chars"
    # one 2-gram covering a large share of the characters
    text = " ".join(("stone garden " * 3 + prose(6, i).strip()) for i in range(15))
    assert quality_reason(text, CleanConfig(max_duplicate_ngram_fraction={})) == "top_2gram_fraction"
    # a passage repeated inside an otherwise varied document
    passage, a, b = (prose(n, seed).replace("\n", " ") for n, seed in ((40, 99), (60, 1), (30, 2)))
    text = a + passage + "\n" + b + passage + "\n"
    assert quality_reason(text, CleanConfig(max_top_ngram_fraction={})) == "duplicate_5gram_fraction"
    # the thresholds are the config's: loosened, the same documents pass
    loose = CleanConfig(max_top_ngram_fraction={2: 1.0}, max_duplicate_ngram_fraction={5: 1.0})
    assert quality_reason(text, loose) == ""


def test_normalize_fixes_mojibake_nfc_controls_and_whitespace():
    raw = "Caf\u0065\u0301 schÃ¶n\x00\x1b bell\r\nzero\u200bwidth   gap\u00a0x   \n\n\n\n    indented\t\tcode  \n"
    out = normalize(raw)
    assert "Café" in out and "\u0301" not in out  # NFC composes e + combining acute
    assert "schön" in out  # ftfy repaired UTF-8 read as Windows-1252
    assert "\x00" not in out and "\x1b" not in out and "\r" not in out and "\u200b" not in out
    assert "gap x" in out and "\n\n\n" not in out
    assert "\n    indented code\n" in out  # indentation kept, inner runs collapsed
    assert out.endswith("\n") and not out.endswith("\n\n")
    assert normalize(" \n\t \n") == ""


def test_mojibake_fixed_line_by_line_as_ftfy_does():
    import ftfy

    doc = "plain ASCII &amp; line\nschÃ¶n and â€œquotedâ€\x9d\n\nmore ASCII\nï¬\x81ne ligature, Ｗｉｄｅ\nlast"
    assert fix_mojibake(doc) == ftfy.fix_text(doc, _FTFY)
    assert "schön" in fix_mojibake(doc) and "&amp;" in fix_mojibake(doc)  # entities are the extractor's


PAGE = """<html><head><title>T</title><script>var x = 1;</script></head><body>
<nav><ul><li><a href="/">Home</a></li><li><a href="/about">About us</a></li><li><a href="/x">Contact</a></li></ul></nav>
<div class="sidebar">Subscribe to our newsletter! Follow us on social media.</div>
<main><article><h1>The river stone garden</h1>
<p>{body}</p><p>{body2}</p></article></main>
<footer>Copyright 2026 Example Corp. All rights reserved. Privacy policy. Terms of use.</footer>
</body></html>"""


@pytest.mark.parametrize("extractor", ["resiliparse", "trafilatura"])
def test_html_extraction_keeps_main_text(extractor):
    body, body2 = prose(80, 3).replace("\n", " "), prose(80, 4).replace("\n", " ")
    text = extract_html(PAGE.format(body=body, body2=body2), extractor)
    assert body.split(".")[0] in text and body2.split(".")[0] in text
    assert "var x" not in text and "Copyright" not in text


def test_broken_html_and_empty_documents_get_reasons():
    cfg = CleanConfig(min_words=5)
    text, reason = clean_one("<html><body><p>unclosed <b>tags <div>and <<< garbage &amp; more words here", True, cfg)
    assert reason in ("", "too_few_words")  # parsed, not crashed
    assert clean_one("<html><body></body></html>", True, cfg)[1] == "empty"
    assert clean_one("   \n\t  ", False, cfg)[1] == "empty"


def test_language_filter():
    # the sample repeats its sentence, so the repetition filters are off here
    cfg = CleanConfig(min_words=5, languages=["en"], max_top_ngram_fraction={}, max_duplicate_ngram_fraction={})
    english = prose(60)
    german = ("Der schnelle braune Fuchs springt über den faulen Hund und läuft dann nach Hause, "
              "wo er den ganzen Nachmittag im Garten schläft und von Wäldern träumt. ") * 5
    assert clean_one(english, False, cfg)[1] == ""
    assert clean_one(german, False, cfg)[1] == "language"
    assert clean_one(german, False, cfg.model_copy(update={"languages": ["de"]}))[1] == ""


def test_clean_batch_counts_every_row():
    import numpy as np

    batch = {"text": np.array([prose(100), "short", ""], dtype=object), "html": np.array([False, False, False]),
             "reason": np.array(["", "", "truncated"], dtype=object), "preview": np.array(["", "", "x"], dtype=object)}
    out = clean_batch(batch, CFG.model_dump())
    assert out["reason"].tolist() == ["", "too_few_words", "truncated"]
    assert out["preview"][1] == "short\n" and out["text"][1] == ""
