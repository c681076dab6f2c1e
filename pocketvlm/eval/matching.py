"""Reading a model's free-text answer as a VQA answer, one rule per ``answer_kind``.

Rules (in the manner of lmms-eval / VLMEvalKit's exact-match scorers, kept deliberately simple so a
reader can predict the verdict):

* every prediction is first normalised: lowercase, punctuation turned into spaces, the articles "a", "an",
  "the" dropped, "grey" spelled "gray", whitespace collapsed;
* ``word``: correct if the normalised prediction equals the answer, or its first word does, or (for a
  multi-word answer) it starts with the answer's words; a parse failure if nothing is left after normalising;
* ``yesno``: the first "yes" or "no" word; a parse failure if there is none;
* ``number``: the first integer written in digits ("3", "1,024") or as a word ("zero" .. "twenty"); a parse
  failure if there is none;
* ``option``: a letter A-E from "B", "(B)", "B.", "B) blue", "Option B", "the answer is B", "Answer: (b)";
  a parse failure if there is none. A capital "A" that reads as the article ("A red circle") is not an option.

A parse failure always counts as wrong. :func:`match` returns ``(parsed, correct)`` with ``parsed`` None on a
parse failure.
"""
from __future__ import annotations

import re
import string

ANSWER_KINDS = ("word", "yesno", "number", "option")
OPTION_LETTERS = "ABCDE"

ARTICLES = frozenset({"a", "an", "the"})
SPELLINGS = {"grey": "gray"}
NUMBER_WORDS = {w: i for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen twenty".split())}

_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")
_NUMBER = re.compile(r"(?<![\w.])(\d{1,3}(?:,\d{3})+|\d+)(?![\d])|\b(" + "|".join(NUMBER_WORDS) + r")\b")
# Explicit option forms, in the order they are tried; each captures the letter.
_OPTION_WHOLE = re.compile(r"^\s*(?:option\s*)?[(\[]?([a-e])[)\]]?[.:)]?\s*$", re.IGNORECASE)
_OPTION_LEAD = re.compile(r"^\s*(?:[(\[]([A-Ea-e])[)\]]|([A-E])(?:[).:]|\s+-\s))")
_OPTION_SAID = re.compile(r"\b(?:option|answer|choice)\s*(?:is|:|would be|=)?\s*[(\[]?([a-e])\b[)\]]?",
                          re.IGNORECASE)
_OPTION_BARE = re.compile(r"(?<![A-Za-z'])[(\[]?([A-E])(?![A-Za-z'])")


def normalize(text: str) -> str:
    """Lowercase, punctuation to spaces, articles dropped, British spellings mapped, whitespace collapsed."""
    words = _PUNCT.sub(" ", str(text).lower()).split()
    return " ".join(SPELLINGS.get(w, w) for w in words if w not in ARTICLES)


def parse_word(prediction: str) -> str | None:
    return normalize(prediction) or None


def parse_yesno(prediction: str) -> str | None:
    return next((w for w in normalize(prediction).split() if w in ("yes", "no")), None)


def parse_number(prediction: str) -> int | None:
    m = _NUMBER.search(str(prediction).lower())
    if m is None:
        return None
    return int(m.group(1).replace(",", "")) if m.group(1) else NUMBER_WORDS[m.group(2)]


def parse_option(prediction: str) -> str | None:
    text = str(prediction).strip()
    for pattern in (_OPTION_WHOLE, _OPTION_LEAD):
        m = pattern.search(text)
        if m:
            return (m.group(1) or m.group(m.lastindex)).upper()
    for pattern in (_OPTION_SAID, _OPTION_BARE):
        for m in pattern.finditer(text):
            # "the answer is a red circle", "A red circle": an "a" followed by a word is the article.
            if m.group(1) in "aA" and re.match(r"\s+[a-z]", text[m.end():]):
                continue
            return m.group(1).upper()
    return None


PARSERS = {"word": parse_word, "yesno": parse_yesno, "number": parse_number, "option": parse_option}


def canonical_answer(answer, kind: str):
    """The reference answer in the form its parser produces; None if it cannot be read that way."""
    if kind == "number" and isinstance(answer, int) and not isinstance(answer, bool):
        return answer
    return PARSERS[kind](str(answer))


def match(prediction: str, answer, kind: str) -> tuple[object, bool]:
    """``(parsed, correct)`` for one prediction; ``parsed`` is None when the prediction cannot be read."""
    parsed = PARSERS[kind](prediction or "")
    if parsed is None:
        return None, False
    gold = canonical_answer(answer, kind)
    if kind != "word":
        return parsed, parsed == gold
    words, gold_words = parsed.split(), gold.split()
    correct = parsed == gold or words[0] == gold or (len(gold_words) > 1 and words[:len(gold_words)] == gold_words)
    return parsed, correct
