"""VQA accuracy of any vision-language model, with a blind baseline (in the manner of lmms-eval / VLMEvalKit).

* Data: a JSONL file (or a JSON list), one question per row: ``{"id", "image", "question", "answer", "type",
  "answer_kind", "choices"?}``; ``image`` is relative to the file's folder or absolute. Everything is checked
  by :func:`load_questions` before any model work: a bad row is a :class:`~pocketvlm.errors.DataError` that
  names its line and id.
* The model is any ``answer_fn(image: PIL.Image, question: str) -> str``; :func:`pocketvlm_answerer` wraps a
  :class:`pocketvlm.api.PocketModel` (greedy), but a ``transformers`` or llama.cpp wrapper plugs in the same way.
* Questions run grouped by image, so an engine with prefix caching (pocketvlm's slot) encodes each image once
  and reuses its prompt prefix for the image's other questions.
* Scoring: :mod:`pocketvlm.eval.matching` per ``answer_kind``; a prediction that cannot be read is a parse
  failure and counts as wrong. Accuracies come with a 95% Wilson score interval (sound at small n and near 0
  or 1, unlike the normal approximation).
* Blind baseline: the same questions with every image replaced by a uniform mid-gray (128, 128, 128) image of
  the same size. The gap to blind says how much of the accuracy comes from looking at the image rather than
  from the language prior; chance (1 / number of choices) is the floor below both.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from PIL import Image

from ..batch.pipeline import prefetch
from ..errors import DataError, ImageError
from .matching import ANSWER_KINDS, OPTION_LETTERS, canonical_answer, match

QUESTION_TYPES = ("colour", "shape", "count", "relation", "word", "chart", "yesno", "number", "option", "other")
REQUIRED = ("id", "image", "question", "answer", "type", "answer_kind")
BLANK_RGB = (128, 128, 128)

AnswerFn = Callable[[Image.Image, str], str]


# --- data ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Question:
    id: str
    image: Path  # absolute
    question: str
    answer: str
    type: str
    answer_kind: str
    choices: tuple[str, ...] | None = None
    line: int = 0  # 1-based line (JSONL) or row (JSON list) in the file

    @property
    def chance(self) -> float | None:
        return 1.0 / len(self.choices) if self.choices else None


def _rows(path: Path) -> Iterable[tuple[int, object]]:
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: not valid JSON ({e})") from None
        yield from enumerate(rows, 1)
        return
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield n, json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}, line {n}: not valid JSON ({e.msg} at column {e.colno})") from None


def _question(row, n: int, path: Path) -> Question:
    where = f"{path}, line {n}"
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    if "id" in row:
        where += f" (id {row['id']!r})"
    missing = [k for k in REQUIRED if k not in row or row[k] is None or row[k] == ""]
    if missing:
        raise DataError(f"{where}: missing field(s) {', '.join(missing)}; every row needs {', '.join(REQUIRED)}")
    qtype, kind = row["type"], row["answer_kind"]
    if qtype not in QUESTION_TYPES:
        raise DataError(f"{where}: unknown type {qtype!r}; known types: {', '.join(QUESTION_TYPES)}")
    if kind not in ANSWER_KINDS:
        raise DataError(f"{where}: unknown answer_kind {kind!r}; known kinds: {', '.join(ANSWER_KINDS)}")
    if not isinstance(row["question"], str):
        raise DataError(f"{where}: question must be a string")
    choices = row.get("choices")
    if choices is not None:
        if not isinstance(choices, list) or not choices:
            raise DataError(f"{where}: choices must be a non-empty list")
        choices = tuple(str(c) for c in choices)
    answer = row["answer"]
    if (not isinstance(answer, (str, int)) or isinstance(answer, bool)
            or canonical_answer(answer, kind, choices) is None):
        expect = {"word": "a word", "yesno": '"yes" or "no"', "number": "an integer",
                  "option": f"a letter {OPTION_LETTERS[0]}-{OPTION_LETTERS[-1]} or one of its choices"}[kind]
        raise DataError(f"{where}: answer {answer!r} is not {expect} (answer_kind {kind!r})")
    image = Path(str(row["image"])).expanduser()
    image = image if image.is_absolute() else path.parent / image
    if not image.is_file():
        raise DataError(f"{where}: image {str(image)!r} does not exist")
    return Question(str(row["id"]), image.resolve(), row["question"], str(answer), qtype, kind, choices, n)


def load_questions(path: str | Path) -> list[Question]:
    """Read and check a question file (JSONL or a JSON list; a folder means its ``questions.jsonl``)."""
    path = Path(path).expanduser()
    if path.is_dir():
        path = path / "questions.jsonl"
    if not path.is_file():
        raise DataError(f"question file {str(path)!r} does not exist")
    questions, seen = [], {}
    for n, row in _rows(path):
        q = _question(row, n, path)
        if q.id in seen:
            raise DataError(f"{path}, line {n}: id {q.id!r} is already used on line {seen[q.id]}")
        seen[q.id] = n
        questions.append(q)
    if not questions:
        raise DataError(f"{path}: no questions")
    return questions


def select(questions: list[Question], limit: int | None = None, per_type: int | None = None) -> list[Question]:
    """The first ``per_type`` questions of each type (file order), then the first ``limit`` of those."""
    if per_type is not None:
        counts: dict[str, int] = {}
        kept = []
        for q in questions:
            counts[q.type] = counts.get(q.type, 0) + 1
            if counts[q.type] <= per_type:
                kept.append(q)
        questions = kept
    return questions[:limit] if limit is not None else list(questions)


def by_image(questions: list[Question]) -> list[tuple[Path, list[int]]]:
    """Indices of ``questions`` grouped by image: images in order of first appearance, questions in order."""
    groups: dict[Path, list[int]] = {}
    for i, q in enumerate(questions):
        groups.setdefault(q.image, []).append(i)
    return list(groups.items())


# --- statistics ---------------------------------------------------------------------------------------

def wilson_interval(correct: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """The Wilson score interval for a proportion (95% by default); (0, 1) when n is 0."""
    if n == 0:
        return 0.0, 1.0
    p = correct / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass(frozen=True)
class Record:
    id: str
    type: str
    question: str
    answer: str
    prediction: str
    parsed: object  # None: parse failure
    correct: bool
    chance: float | None = None


@dataclass(frozen=True)
class Summary:
    n: int
    correct: int
    accuracy: float
    ci95: tuple[float, float]
    parse_failures: int
    parse_failure_rate: float
    chance: float | None  # mean of 1/len(choices) over the questions that give choices; None if none do

    @classmethod
    def of(cls, records: list[Record]) -> Summary:
        n = len(records)
        correct = sum(r.correct for r in records)
        fails = sum(r.parsed is None for r in records)
        chances = [r.chance for r in records if r.chance is not None]
        return cls(n, correct, correct / n if n else 0.0, wilson_interval(correct, n), fails,
                   fails / n if n else 0.0, sum(chances) / len(chances) if chances else None)


def _type_order(types: Iterable[str]) -> list[str]:
    types = set(types)
    return [t for t in QUESTION_TYPES if t in types] + sorted(types - set(QUESTION_TYPES))


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def _acc_ci(s: Summary) -> str:
    return f"{_pct(s.accuracy)} [{_pct(s.ci95[0])}, {_pct(s.ci95[1])}]"


def _render(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    fmt = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
    lines = [fmt(header), "  ".join("-" * w for w in widths)]
    lines += [fmt(r) for r in rows[:-1]] + ["  ".join("-" * w for w in widths), fmt(rows[-1])]
    return "\n".join(lines)


@dataclass
class EvalResult:
    """Per-question records of one run, with per-type and overall summaries."""

    records: list[Record]
    blind: bool = False
    seconds: float = 0.0
    meta: dict = field(default_factory=dict)

    @property
    def per_type(self) -> dict[str, Summary]:
        return {t: Summary.of([r for r in self.records if r.type == t])
                for t in _type_order(r.type for r in self.records)}

    @property
    def overall(self) -> Summary:
        return Summary.of(self.records)

    @property
    def accuracy(self) -> float:
        return self.overall.accuracy

    def to_dict(self) -> dict:
        return {"blind": self.blind, "seconds": round(self.seconds, 3), **self.meta,
                "overall": asdict(self.overall), "per_type": {t: asdict(s) for t, s in self.per_type.items()},
                "records": [asdict(r) for r in self.records]}

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def table(self) -> str:
        header = ["type", "n", "accuracy % [95% CI]", "chance %", "parse fail %"]
        items = list(self.per_type.items()) + [("overall", self.overall)]
        rows = [[t, str(s.n), _acc_ci(s), _pct(s.chance), _pct(s.parse_failure_rate)] for t, s in items]
        return _render(header, rows)


@dataclass
class EvalReport:
    """A model's run and its blind baseline (``blind`` is None when the baseline was not run)."""

    model: EvalResult
    blind: EvalResult | None = None
    meta: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        out = {**self.meta, "model": self.model.to_dict(), "blind": None if self.blind is None else self.blind.to_dict()}
        if self.blind is not None:
            blind = self.blind.per_type
            out["gap_to_blind"] = {t: s.accuracy - blind[t].accuracy for t, s in self.model.per_type.items()}
            out["gap_to_blind"]["overall"] = self.model.accuracy - self.blind.accuracy
        return out

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def table(self) -> str:
        if self.blind is None:
            return self.model.table()
        blind = {**self.blind.per_type, "overall": self.blind.overall}
        header = ["type", "n", "accuracy % [95% CI]", "blind %", "chance %", "gap to blind", "parse fail %"]
        rows = []
        for t, s in list(self.model.per_type.items()) + [("overall", self.model.overall)]:
            b = blind[t]
            rows.append([t, str(s.n), _acc_ci(s), _pct(b.accuracy), _pct(s.chance),
                         f"{100 * (s.accuracy - b.accuracy):+.1f}", _pct(s.parse_failure_rate)])
        return _render(header, rows)


# --- running ------------------------------------------------------------------------------------------

def blank_like(image: Image.Image) -> Image.Image:
    """A uniform mid-gray RGB image of the same size (the blind baseline's input)."""
    return Image.new("RGB", image.size, BLANK_RGB)


def _open(path: Path) -> Image.Image:
    from ..image import load_image

    try:
        return load_image(str(path))
    except ImageError as e:
        raise DataError(f"image {str(path)!r} cannot be used: {e}") from None


def evaluate(answer_fn: AnswerFn, questions: list[Question] | str | Path, *, blind: bool = False,
             progress: bool = True, limit: int | None = None, per_type: int | None = None) -> EvalResult:
    """Ask ``answer_fn(image, question)`` every question (grouped by image) and score the answers.

    ``questions``: from :func:`load_questions`, or a path to load. ``blind=True`` gives the model a uniform
    mid-gray image of the same size instead of each image. ``per_type`` keeps the first N questions of each
    type, ``limit`` the first N of those."""
    from tqdm.auto import tqdm

    if isinstance(questions, (str, Path)):
        questions = load_questions(questions)
    chosen = select(list(questions), limit=limit, per_type=per_type)
    records: list[Record | None] = [None] * len(chosen)
    n_done = n_correct = 0
    t0 = time.perf_counter()
    groups = by_image(chosen)

    def image_of(group):
        image = _open(group[0])
        return blank_like(image) if blind else image

    with tqdm(total=len(chosen), desc="eval (blind)" if blind else "eval", disable=not progress,
              unit="q") as bar:
        # The batch runner's bounded pipeline: the next images are decoded while the model answers.
        for (path, group), image in zip(groups, prefetch(groups, image_of, depth=4)):
            for i in group:
                q = chosen[i]
                prediction = answer_fn(image, q.question)
                prediction = "" if prediction is None else str(prediction)
                parsed, correct = match(prediction, q.answer, q.answer_kind, q.choices)
                records[i] = Record(q.id, q.type, q.question, q.answer, prediction, parsed, correct, q.chance)
                n_done += 1
                n_correct += correct
                bar.update(1)
                bar.set_postfix(acc=f"{100 * n_correct / n_done:.1f}%")
    # Records in the order of the question file, whatever order they ran in.
    return EvalResult(records, blind=blind, seconds=time.perf_counter() - t0)


def run_eval(model_answer_fn: AnswerFn, questions: list[Question] | str | Path, blind: bool = True, *,
             progress: bool = True, limit: int | None = None, per_type: int | None = None) -> EvalReport:
    """The real run and (with ``blind=True``) the blind baseline on the same questions, in one report."""
    if isinstance(questions, (str, Path)):
        questions = load_questions(questions)
    kw = dict(progress=progress, limit=limit, per_type=per_type)
    real = evaluate(model_answer_fn, questions, blind=False, **kw)
    base = evaluate(model_answer_fn, questions, blind=True, **kw) if blind else None
    return EvalReport(real, base)


def pocketvlm_answerer(model, max_tokens: int = 16, reuse_prefix: bool = True) -> AnswerFn:
    """An ``answer_fn`` for a model from :func:`pocketvlm.load`: one greedy single-turn chat per question.

    Each question is a fresh one-message conversation, so the answer does not depend on the previous
    question. The model's slot keeps the last prompt's KV cache and reuses the longest common prefix (keyed
    by token ids and the image's content hash), which for consecutive questions about one image is the
    template head plus all image tokens. ``reuse_prefix=False`` resets the slot before every question
    (slower; the same answers up to floating-point rounding of the chunked prefill)."""
    if not getattr(model, "is_vlm", True):
        raise ImageError(f"{model.architecture} is a text-only model: it cannot answer questions about images "
                         "(load a vision-language model)")

    def answer(image: Image.Image, question: str) -> str:
        if not reuse_prefix:
            model.reset()
        messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image}},
                                                 {"type": "text", "text": question}]}]
        return model.chat(messages, temperature=0, max_tokens=max_tokens)

    return answer


def transformers_answerer(folder, max_tokens: int = 16) -> AnswerFn:
    """Greedy answers of ``transformers``' ``LlavaForConditionalGeneration`` (float32) on a LLaVA folder, with its
    own processor and chat template: the reference pocketvlm's answers are compared with (needs transformers)."""
    import torch
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    proc = AutoProcessor.from_pretrained(folder)
    model = LlavaForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()

    def answer(image: Image.Image, question: str) -> str:
        msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        inputs = proc(images=image, text=proc.apply_chat_template(msgs, add_generation_prompt=True),
                      return_tensors="pt")
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=max_tokens, do_sample=False)
        return proc.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()

    return answer
