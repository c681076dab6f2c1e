"""Reading a model's free-text answer as a VQA answer, one rule per ``answer_kind``.

Rules (in the manner of lmms-eval / VLMEvalKit's exact-match scorers, kept deliberately simple so a
reader can predict the verdict):

* every prediction is first normalised: lowercase, punctuation turned into spaces, the articles "a", "an",
  "the" dropped (unless nothing else is left: "A." is the label A), "grey" spelled "gray", whitespace collapsed;
* ``word``: correct if the normalised prediction equals the answer, or its first word does, or (for a
  multi-word answer) it starts with the answer's words; a parse failure if nothing is left after normalising;
* ``yesno``: the first "yes" or "no" word; a parse failure if there is none;
* ``number``: the first integer written in digits ("3", "1,024") or as a word ("zero" .. "twenty"); a parse
  failure if there is none;
* ``option`` with a letter answer: a letter A-E from "B", "(B)", "B.", "B) blue", "Option B", "the answer is
  B", "Answer: (b)"; a capital "A" that reads as the article ("A red circle") is not an option. Without a
  letter, a prediction that names one of the listed (non-letter) choices counts as that choice's letter
  ("green" for B of [red, green, blue]). A parse failure if neither is found;
* ``option`` with an answer that is one of its ``choices`` (named options, e.g. "left" of [left, right]):
  the choice the prediction names first; a parse failure if it names none.

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
    kept = [w for w in words if w not in ARTICLES] or words  # "A" alone is a label (chart bar A), not an article
    return " ".join(SPELLINGS.get(w, w) for w in kept)


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


def parse_choice(prediction: str, choices) -> str | None:
    """The choice (normalised) the prediction names first, whole words only; the longer one on a tie
    ("dark blue" over "blue")."""
    words = normalize(prediction).split()
    best = None  # (position, -length, choice)
    for choice in {normalize(c) for c in choices} - {""}:
        cw = choice.split()
        pos = next((i for i in range(len(words) - len(cw) + 1) if words[i:i + len(cw)] == cw), None)
        if pos is not None and (best is None or (pos, -len(cw)) < best[:2]):
            best = (pos, -len(cw), choice)
    return None if best is None else best[2]


def is_letter(answer) -> bool:
    return isinstance(answer, str) and len(answer.strip()) == 1 and answer.strip().upper() in OPTION_LETTERS


def parse_option_answer(prediction: str, answer, choices=None) -> str | None:
    """An option prediction in the form of ``answer``: a letter when the answer is a letter (or, when no
    letter is found, the letter of the listed choice the prediction names), else the named choice."""
    if not is_letter(answer):
        return parse_choice(prediction, choices or ())
    letter = parse_option(prediction)
    if letter is None and choices and not all(is_letter(c) for c in choices):
        named = parse_choice(prediction, choices)
        if named is not None:
            letter = OPTION_LETTERS[[normalize(c) for c in choices].index(named)]
    return letter


PARSERS = {"word": parse_word, "yesno": parse_yesno, "number": parse_number, "option": parse_option}


def canonical_answer(answer, kind: str, choices=None):
    """The reference answer in the form its parser produces; None if it cannot be read that way (for an
    option: a letter A-E, or one of ``choices``)."""
    if kind == "number" and isinstance(answer, int) and not isinstance(answer, bool):
        return answer
    if kind == "option":
        if is_letter(answer):
            return answer.strip().upper()
        gold = normalize(answer)
        return gold if gold and gold in {normalize(c) for c in choices or ()} else None
    return PARSERS[kind](str(answer))


def match(prediction: str, answer, kind: str, choices=None) -> tuple[object, bool]:
    """``(parsed, correct)`` for one prediction; ``parsed`` is None when the prediction cannot be read.
    ``choices`` matter only for an option answered by name (see :func:`parse_option_answer`)."""
    prediction = prediction or ""
    parsed = parse_option_answer(prediction, answer, choices) if kind == "option" else PARSERS[kind](prediction)
    if parsed is None:
        return None, False
    gold = canonical_answer(answer, kind, choices)
    if kind != "word":
        return parsed, parsed == gold
    words, gold_words = parsed.split(), gold.split()
    correct = parsed == gold or words[0] == gold or (len(gold_words) > 1 and words[:len(gold_words)] == gold_words)
    return parsed, correct
