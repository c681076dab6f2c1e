"""Questions, answers and captions for the synthetic scenes.

Question types (``QA.type``) and answer kinds (``QA.answer_kind``):

==========  =====================================================  ===========
type        asks                                                   answer_kind
==========  =====================================================  ===========
colour      the colour of the only object of a shape               word
shape       the shape of the only object of a colour               word
count       objects in all, of one shape, or of one colour (1-6)   number
relation    left/right or above/below between two unique objects   option
word        the word (lowercase) or number (digits) written        word/number
chart       tallest / shortest bar (capital letter), bar count     word/number
yesno       is there a <colour> <shape>? (balanced)                yesno
==========  =====================================================  ===========

Training data may add ``bars`` (:data:`DRILL_TYPES`; never evaluated): questions that name a bar by its
letter (which bar is red, what colour is bar C, is bar B taller than bar D, which bar is the second
tallest), so the letter under each bar is tied to the bar's position and height.

``QA.answer`` is the canonical answer used by evaluation: lowercase ("red", "left", "yes", "apple"),
digits ("3", "42"), except bar labels which stay capital letters ("C") as written in the chart
(compare case-insensitively). Training conversations show :func:`chat_answer`: the same with its
first letter capitalised ("Red", "Yes", "C", "3"). Every question shown to a model ends with
:data:`ANSWER_SUFFIX` so the trained model answers tersely (LLaVA's VQA style).
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field

from .render import COLOURS, SHAPES, Bar, Background, Obj, TextItem

ANSWER_SUFFIX = "\nAnswer with a single word or number."
QUESTION_TYPES = ("colour", "shape", "count", "relation", "word", "chart", "yesno")
DRILL_TYPES = ("bars",)
#: what ``pocketvlm scenes --types`` accepts
TRAINING_TYPES = QUESTION_TYPES + DRILL_TYPES
COUNT_CHOICES = [str(i) for i in range(1, 7)]
NUMBER_CHOICES = [str(i) for i in range(100)]

WORDS = (
    "cat", "dog", "sun", "car", "bus", "cup", "hat", "box", "pen", "map", "egg", "bed", "key", "fish", "bird",
    "tree", "book", "door", "milk", "rain", "snow", "moon", "star", "ship", "lamp", "ball", "cake", "frog",
    "bear", "lion", "duck", "kite", "rose", "leaf", "road", "king", "apple", "house", "river", "chair",
    "table", "bread", "water", "light", "music", "green", "happy", "horse", "mouse", "plant", "train",
    "cloud", "stone", "sheep", "pizza", "garden", "window", "orange", "rabbit", "summer", "winter", "forest",
)
CAPTION_REQUESTS = (
    "Describe the image briefly.", "What is in this picture?", "Give a short description of the image.",
    "Write a one-sentence caption for this image.", "What does this image show?",
    "Summarize the picture in a sentence.",
)
COLOUR_Q = ("What colour is the {shape}?", "What is the colour of the {shape}?", "What color is the {shape}?",
            "Which colour does the {shape} have?")
SHAPE_Q = ("What shape is the {colour} object?", "What is the shape of the {colour} object?",
           "Which shape is {colour}?", "The {colour} object has which shape?")
COUNT_ALL_Q = ("How many shapes are in the picture?", "How many objects are there?",
               "Count the shapes in the image.", "How many shapes can you see?")
COUNT_SHAPE_Q = ("How many {shape}s are there?", "How many {shape}s are in the picture?", "Count the {shape}s.",
                 "How many {shape}s can you see?")
COUNT_COLOUR_Q = ("How many {colour} shapes are there?", "How many {colour} objects are in the image?",
                  "Count the {colour} shapes.", "How many shapes are {colour}?")
LEFT_RIGHT_Q = ("Is the {a} to the left or to the right of the {b}?", "Is the {a} left or right of the {b}?",
                "Compared with the {b}, is the {a} on the left or on the right?")
ABOVE_BELOW_Q = ("Is the {a} above or below the {b}?", "Is the {a} located above or below the {b}?",
                 "Compared with the {b}, is the {a} above or below it?")
WORD_Q = ("What word is written in the image?", "What does the text say?", "Which word is shown in the picture?",
          "Read the word in the image.")
NUMBER_Q = ("What number is written in the image?", "Which number is shown in the picture?",
            "What number does the image show?", "Read the number in the image.")
TALLEST_Q = ("Which bar is the tallest?", "Which bar is the highest?", "Which label has the tallest bar?",
             "Which bar has the largest value?")
SHORTEST_Q = ("Which bar is the shortest?", "Which bar is the lowest?", "Which label has the shortest bar?",
              "Which bar has the smallest value?")
WHICH_BAR_Q = ("Which bar is {colour}?", "Which label has the {colour} bar?", "What is the label of the {colour} bar?")
BAR_COLOUR_Q = ("What colour is bar {a}?", "What is the colour of bar {a}?", "Which colour does bar {a} have?")
TALLER_Q = ("Is bar {a} taller than bar {b}?", "Is bar {a} higher than bar {b}?")
SHORTER_Q = ("Is bar {a} shorter than bar {b}?", "Is bar {a} lower than bar {b}?")
SECOND_Q = ("Which bar is the second tallest?", "Which bar has the second largest value?")
BARS_Q = ("How many bars are in the chart?", "How many bars does the chart have?", "Count the bars in the chart.")
YESNO_Q = ("Is there a {colour} {shape} in the picture?", "Does the image contain a {colour} {shape}?",
           "Can you see a {colour} {shape}?")
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six")


@dataclass
class QA:
    question: str          # without ANSWER_SUFFIX (see prompt())
    answer: str            # canonical: lowercase, digits, or a capital bar letter
    type: str
    answer_kind: str       # "word", "number", "yesno" or "option"
    choices: list[str]
    meta: dict = field(default_factory=dict)   # what the question is about (for tests and analysis)

    def prompt(self) -> str:
        return self.question + ANSWER_SUFFIX


def chat_answer(qa: QA) -> str:
    """The answer as a training conversation shows it: first letter capitalised."""
    return qa.answer[:1].upper() + qa.answer[1:]


# --- planning a shapes scene (the count question is chosen first, so its answer is uniform on 1..6) ----

def plan_shapes(rng: random.Random, colours: list[str]) -> tuple[list[tuple[str, str]], dict]:
    """(shape, colour) specs for 1..6 objects and the count question's plan ``{"by", "value", "answer"}``."""
    k = rng.randint(1, 6)
    by = rng.choice(("all", "shape", "colour"))
    if by == "all":
        return [(rng.choice(SHAPES), rng.choice(colours)) for _ in range(k)], {"by": "all", "answer": k}
    extra = rng.randint(0, 6 - k)
    if by == "shape":
        target = rng.choice(SHAPES)
        others = [s for s in SHAPES if s != target]
        specs = [(target, rng.choice(colours)) for _ in range(k)]
        specs += [(rng.choice(others), rng.choice(colours)) for _ in range(extra)]
    else:
        target = rng.choice(colours)
        others = [c for c in colours if c != target]
        specs = [(rng.choice(SHAPES), target) for _ in range(k)]
        specs += [(rng.choice(SHAPES), rng.choice(others)) for _ in range(extra)]
    rng.shuffle(specs)
    return specs, {"by": by, "value": target, "answer": k}


# --- question makers ----------------------------------------------------------------------------------

def count_question(rng: random.Random, plan: dict, objects: list[Obj]) -> QA:
    by, value = plan["by"], plan.get("value")
    if by == "all":
        n, q = len(objects), rng.choice(COUNT_ALL_Q)
    elif by == "shape":
        n, q = sum(o.shape == value for o in objects), rng.choice(COUNT_SHAPE_Q).format(shape=value)
    else:
        n, q = sum(o.colour == value for o in objects), rng.choice(COUNT_COLOUR_Q).format(colour=value)
    return QA(q, str(n), "count", "number", list(COUNT_CHOICES), {"by": by, "value": value})


def colour_questions(rng: random.Random, objects: list[Obj], limit: int) -> list[QA]:
    unique = [o for o in objects if sum(p.shape == o.shape for p in objects) == 1]
    return [QA(rng.choice(COLOUR_Q).format(shape=o.shape), o.colour, "colour", "word", list(COLOURS),
               {"shape": o.shape}) for o in rng.sample(unique, min(limit, len(unique)))]


def shape_questions(rng: random.Random, objects: list[Obj], limit: int) -> list[QA]:
    unique = [o for o in objects if sum(p.colour == o.colour for p in objects) == 1]
    return [QA(rng.choice(SHAPE_Q).format(colour=o.colour), o.shape, "shape", "word", list(SHAPES),
               {"colour": o.colour}) for o in rng.sample(unique, min(limit, len(unique)))]


def relation_pairs(objects: list[Obj], w: int, h: int) -> list[tuple[Obj, Obj, str]]:
    """Pairs of uniquely described objects clearly separated along one axis, with that axis."""
    unique = [o for o in objects if sum(p.description == o.description for p in objects) == 1]
    pairs = []
    for i, a in enumerate(unique):
        for b in unique[i + 1:]:
            dx, dy = abs(a.cx - b.cx), abs(a.cy - b.cy)
            if dx > 1.5 * dy and dx >= 0.25 * w:
                pairs.append((a, b, "x"))
            elif dy > 1.5 * dx and dy >= 0.25 * h:
                pairs.append((a, b, "y"))
    return pairs


def relation_questions(rng: random.Random, objects: list[Obj], w: int, h: int, limit: int) -> list[QA]:
    pairs = relation_pairs(objects, w, h)
    out = []
    for a, b, axis in rng.sample(pairs, min(limit, len(pairs))):
        if rng.random() < 0.5:
            a, b = b, a
        if axis == "x":
            q, choices = rng.choice(LEFT_RIGHT_Q), ["left", "right"]
            ans = "left" if a.cx < b.cx else "right"
        else:
            q, choices = rng.choice(ABOVE_BELOW_Q), ["above", "below"]
            ans = "above" if a.cy < b.cy else "below"
        out.append(QA(q.format(a=a.description, b=b.description), ans, "relation", "option", choices,
                      {"a": a.description, "b": b.description, "axis": axis}))
    return out


def yesno_questions(rng: random.Random, objects: list[Obj], colours: list[str]) -> list[QA]:
    """One "yes" and one "no" question; half of the "no" ones share a colour or shape with the scene."""
    present = {(o.colour, o.shape) for o in objects}
    yes_c, yes_s = rng.choice(sorted(present))
    absent = [(c, s) for c in colours for s in SHAPES if (c, s) not in present]
    near = [(c, s) for c, s in absent if any(c == pc or s == ps for pc, ps in present)]
    no_c, no_s = rng.choice(near if near and rng.random() < 0.5 else absent)
    out = [QA(rng.choice(YESNO_Q).format(colour=c, shape=s), ans, "yesno", "yesno", ["yes", "no"],
              {"colour": c, "shape": s}) for c, s, ans in ((yes_c, yes_s, "yes"), (no_c, no_s, "no"))]
    rng.shuffle(out)
    return out


def word_question(rng: random.Random, text: TextItem) -> QA:
    if text.is_number:
        return QA(rng.choice(NUMBER_Q), text.answer, "word", "number", list(NUMBER_CHOICES), {"text": text.text})
    return QA(rng.choice(WORD_Q), text.answer, "word", "word", list(WORDS), {"text": text.text})


def chart_questions(rng: random.Random, bars: list[Bar]) -> list[QA]:
    labels = [b.label for b in bars]
    tall, short = max(bars, key=lambda b: b.height), min(bars, key=lambda b: b.height)
    return [QA(rng.choice(TALLEST_Q), tall.label, "chart", "word", labels, {"asks": "tallest"}),
            QA(rng.choice(SHORTEST_Q), short.label, "chart", "word", labels, {"asks": "shortest"}),
            QA(rng.choice(BARS_Q), str(len(bars)), "chart", "number", list(COUNT_CHOICES), {"asks": "count"})]


def bar_questions(rng: random.Random, bars: list[Bar]) -> list[QA]:
    """The ``bars`` drill: questions that name bars by letter (for training only, see DRILL_TYPES)."""
    labels = [b.label for b in bars]
    by_height = sorted(bars, key=lambda b: -b.height)
    out = [QA(rng.choice(SECOND_Q), by_height[1].label, "bars", "word", labels, {"asks": "second"})]
    if len({b.colour for b in bars}) == len(bars):          # one colour per bar: name a bar by its colour
        a, b = rng.sample(bars, 2)
        out.append(QA(rng.choice(WHICH_BAR_Q).format(colour=a.colour), a.label, "bars", "word", labels,
                      {"asks": "which", "colour": a.colour}))
        out.append(QA(rng.choice(BAR_COLOUR_Q).format(a=b.label), b.colour, "bars", "word", list(COLOURS),
                      {"asks": "colour", "label": b.label}))
    for want in rng.sample(("yes", "no"), 2):                # one yes and one no comparison
        a, b = rng.sample(bars, 2)
        taller = rng.random() < 0.5
        if (want == "yes") != ((a.height > b.height) == taller):
            a, b = b, a
        q = rng.choice(TALLER_Q if taller else SHORTER_Q).format(a=a.label, b=b.label)
        out.append(QA(q, want, "bars", "yesno", ["yes", "no"], {"asks": "taller" if taller else "shorter",
                                                                   "a": a.label, "b": b.label}))
    return out


# --- captions -----------------------------------------------------------------------------------------

def place_words(o: Obj, w: int, h: int) -> str:
    """Coarse position on a 3x3 grid: 'in the top left', 'on the left', 'in the centre', ..."""
    col = ("left", "", "right")[min(2, int(3 * o.cx / w))]
    row = ("top", "", "bottom")[min(2, int(3 * o.cy / h))]
    if row and col:
        return f"in the {row} {col}"
    if row:
        return f"at the {row}"
    if col:
        return f"on the {col}"
    return "in the centre"


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def shapes_caption(objects: list[Obj], bg: Background, w: int, h: int) -> str:
    items = [f"{_article(f'{o.size} {o.colour} {o.shape}')} {place_words(o, w, h)}"
             for o in sorted(objects, key=lambda o: (min(2, int(3 * o.cy / h)), o.cx))]   # row by row
    if len(objects) == 1:
        return f"{items[0][0].upper()}{items[0][1:]}, on {bg.describe()}."
    n = NUMBER_WORDS[len(objects)].capitalize()
    return f"{n} shapes on {bg.describe()}: {_join(items)}."


def text_caption(text: TextItem, extra: list[Obj], bg: Background, w: int, h: int) -> str:
    what = f"The number {text.text}" if text.is_number else f"The word \"{text.text}\""
    cap = f"{what} written in {text.colour} on {bg.describe()}."
    if extra:
        o = extra[0]
        cap += f" There is also {_article(f'{o.size} {o.colour} {o.shape}')} {place_words(o, w, h)}."
    return cap


def chart_caption(bars: list[Bar], bg: Background) -> str:
    tall, short = max(bars, key=lambda b: b.height), min(bars, key=lambda b: b.height)
    colours = {b.colour for b in bars}
    how = f"{bars[0].colour} bars" if len(colours) == 1 else "bars of different colours"
    return (f"A bar chart with {NUMBER_WORDS[len(bars)]} {how} labelled A to {bars[-1].label} on {bg.describe()}; "
            f"bar {tall.label} is the tallest and bar {short.label} the shortest.")
