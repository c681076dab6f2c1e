"""Scenes (image + caption + questions) and the files training and evaluation read.

Scene ``index`` of seed ``seed`` draws every choice from ``random.Random(f"{seed}:{index}")``, so any
scene can be regenerated alone and the same (seed, index) gives the same pixels and texts. Kinds are
mixed about 55% shapes, 25% text, 20% bar charts.

Files (LLaVA conversation format, image paths relative to ``out_dir``):

- ``images/<seed>-<index>.png``
- ``captions.json``: one caption conversation per image (stage 1, projector alignment)
- ``instruct.json``: one multi-turn conversation per image holding all its questions, shuffled
- ``questions.jsonl`` (eval): one row per question: id, image, question, answer, type, answer_kind, choices
"""
from __future__ import annotations

import json
import math
import random
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

from PIL import Image, ImageDraw
from tqdm import tqdm

from ..errors import PocketVLMError
from . import questions as Q
from . import render as R

KIND_WEIGHTS = (("shapes", 0.55), ("text", 0.25), ("chart", 0.20))
BALANCED = ("count", "yesno")   # eval types whose answers write_eval balances exactly over their choices


@dataclass
class Scene:
    seed: int
    index: int
    kind: str                       # "shapes", "text" or "chart"
    image: Image.Image              # RGB
    caption: str
    qa: list[Q.QA]
    background: R.Background
    objects: list[R.Obj] = field(default_factory=list)   # every drawn shape (text scenes: the extra one)
    text: R.TextItem | None = None
    bars: list[R.Bar] = field(default_factory=list)
    count_plan: dict | None = None  # shapes scenes: what the count question counts

    @property
    def name(self) -> str:
        return f"{self.seed}-{self.index}"


def _kind(rng: random.Random) -> str:
    u = rng.random()
    for kind, p in KIND_WEIGHTS:
        if u < p:
            return kind
        u -= p
    return KIND_WEIGHTS[-1][0]


def _shapes_scene(rng, seed, index) -> Scene:
    w, h = R.sample_size(rng)
    bg = R.sample_background(rng)
    colours = R.contrasting_colours(bg)
    for _ in range(20):
        specs, plan = Q.plan_shapes(rng, colours)
        objects = R.place_objects(rng, w, h, specs, bg)
        if objects is not None:
            break
    else:  # six objects in a small image: all small always fit, but never loop forever
        objects = R.place_objects(rng, w, h, specs, bg, sizes=("small",)) or []
        plan = {"by": "all", "answer": len(objects)}
    img = R.background_image(bg, w, h, rng)
    draw = ImageDraw.Draw(img)
    for o in objects:
        R.draw_object(draw, o)
    qa = [Q.count_question(rng, plan, objects)]
    qa += Q.colour_questions(rng, objects, limit=2)
    qa += Q.shape_questions(rng, objects, limit=2)
    qa += Q.relation_questions(rng, objects, w, h, limit=2)
    qa += Q.yesno_questions(rng, objects, colours)
    return Scene(seed, index, "shapes", img, Q.shapes_caption(objects, bg, w, h), qa, bg, objects,
                 count_plan=plan)


def _text_content(rng) -> tuple[str, str, bool]:
    if rng.random() < 0.3:
        n = str(rng.randint(0, 99))
        return n, n, True
    word = rng.choice(Q.WORDS)
    u = rng.random()
    return (word.upper() if u < 0.25 else word.capitalize() if u < 0.5 else word), word, False


def _text_scene(rng, seed, index) -> Scene:
    text, answer, is_number = _text_content(rng)
    bg = R.sample_background(rng)
    colours = R.contrasting_colours(bg)
    colour = rng.choice(colours)
    for attempt in range(40):
        w, h = R.sample_size(rng) if attempt < 30 else (rng.randint(213, 320), 160)
        img = R.background_image(bg, w, h, rng)
        item = R.draw_text(img, rng, text, answer, is_number, colour, rng.uniform(0.2, 0.3))
        if item is not None:
            break
    else:
        raise PocketVLMError(f"scene {seed}:{index}: cannot fit {text!r}")  # unreachable for the vocabulary
    objects = []
    if rng.random() < 0.4:
        others = [c for c in colours if c != colour]
        spec = [(rng.choice(R.SHAPES), rng.choice(others))]
        objects = R.place_objects(rng, w, h, spec, bg, keep_out=item.bbox, sizes=("small",)) or []
        for o in objects:
            R.draw_object(ImageDraw.Draw(img), o)
    qa = [Q.word_question(rng, item)]
    if objects:
        qa += Q.colour_questions(rng, objects, limit=1) + Q.shape_questions(rng, objects, limit=1)
    return Scene(seed, index, "text", img, Q.text_caption(item, objects, bg, w, h), qa, bg, objects, text=item)


def _chart_scene(rng, seed, index) -> Scene:
    w, h = R.sample_size(rng)
    bg = R.sample_background(rng)
    colours = R.contrasting_colours(bg, exclude={"black", "white"})   # those are the axis and label colours
    n = rng.randint(3, 5)
    bar_colours = [rng.choice(colours)] if rng.random() < 0.5 else rng.sample(colours, min(n, len(colours)))
    img = R.background_image(bg, w, h, rng)
    bars = R.draw_chart(img, rng, bg, n, bar_colours)
    return Scene(seed, index, "chart", img, Q.chart_caption(bars, bg), Q.chart_questions(rng, bars), bg, bars=bars)


def make_scene(seed: int, index: int) -> Scene:
    """Scene ``index`` of ``seed``: the same arguments always give the same pixels and texts."""
    rng = random.Random(f"{seed}:{index}")
    maker = {"shapes": _shapes_scene, "text": _text_scene, "chart": _chart_scene}[_kind(rng)]
    return maker(rng, seed, index)


# --- files --------------------------------------------------------------------------------------------

def _save(scene: Scene, out: Path) -> str:
    rel = f"images/{scene.name}.png"
    scene.image.save(out / rel, compress_level=1)
    return rel


def _prepare(out_dir) -> Path:
    out = Path(out_dir)
    try:
        (out / "images").mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PocketVLMError(f"cannot create {out / 'images'}: {e}") from e
    return out


def caption_sample(scene: Scene, rel: str) -> dict:
    rng = random.Random(f"{scene.seed}:{scene.index}:caption")
    return {"id": scene.name, "image": rel, "conversations": [
        {"from": "human", "value": "<image>\n" + rng.choice(Q.CAPTION_REQUESTS)},
        {"from": "gpt", "value": scene.caption}]}


def instruct_sample(scene: Scene, rel: str) -> dict:
    qa = list(scene.qa)
    random.Random(f"{scene.seed}:{scene.index}:order").shuffle(qa)
    turns = []
    for i, item in enumerate(qa):
        turns.append({"from": "human", "value": ("<image>\n" if i == 0 else "") + item.prompt()})
        turns.append({"from": "gpt", "value": Q.chat_answer(item)})
    return {"id": scene.name, "image": rel, "conversations": turns}


def _write_json(path: Path, data) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, ensure_ascii=False, indent=1))
    tmp.replace(path)


def type_fractions(spec) -> dict[str, float]:
    """``"count,chart,shape:0.25"`` (or a list of such items) -> {type: fraction of its questions kept}."""
    items = [t.strip() for t in (spec.split(",") if isinstance(spec, str) else spec) if t.strip()]
    out: dict[str, float] = {}
    for item in items:
        name, _, frac = item.partition(":")
        try:
            f = float(frac) if frac else 1.0
        except ValueError:
            f = -1.0
        if name not in Q.TRAINING_TYPES:
            raise PocketVLMError(f"unknown question type {name!r}; choose from "
                                 f"{', '.join(Q.TRAINING_TYPES)}")
        if not 0.0 < f <= 1.0:
            raise PocketVLMError(f"question type {item!r}: the fraction after ':' must be in (0, 1]")
        out[name] = f
    if not out:
        raise PocketVLMError("no question types given")
    return out


def _keep(scene: Scene, fractions: dict[str, float] | None) -> Scene:
    if fractions is None:
        return scene
    rng = random.Random(f"{scene.seed}:{scene.index}:keep")
    qa = [q for q in scene.qa if rng.random() < fractions.get(q.type, 0.0)]
    if "bars" in fractions and scene.kind == "chart":   # drawn from their own stream: the scene stays the same
        drill = Q.bar_questions(random.Random(f"{scene.seed}:{scene.index}:bars"), scene.bars)
        qa += [q for q in drill if rng.random() < fractions["bars"]]
    return replace(scene, qa=qa)


def write_dataset(out_dir, count: int, seed: int = 0, *, types=None, progress: bool = True) -> dict:
    """Write ``count`` training scenes: images, ``captions.json`` and ``instruct.json``. Returns counts.

    ``types`` (see ``type_fractions``) keeps only those question types in ``instruct.json``, each a
    fraction of the time (chosen per question from the scene's seed); scenes left without a question
    have a caption only. Only a ``types`` that names it adds the training-only ``bars`` drill."""
    if count < 1:
        raise PocketVLMError(f"count must be at least 1, got {count}")
    fractions = None if types is None else type_fractions(types)
    out = _prepare(out_dir)
    captions, instruct = [], []
    kinds: dict[str, int] = {}
    types_seen: dict[str, int] = {}
    for i in tqdm(range(count), desc="scenes", unit="img", disable=not progress):
        scene = _keep(make_scene(seed, i), fractions)
        rel = _save(scene, out)
        captions.append(caption_sample(scene, rel))
        if scene.qa:
            instruct.append(instruct_sample(scene, rel))
        kinds[scene.kind] = kinds.get(scene.kind, 0) + 1
        for qa in scene.qa:
            types_seen[qa.type] = types_seen.get(qa.type, 0) + 1
    _write_json(out / "captions.json", captions)
    _write_json(out / "instruct.json", instruct)
    return {"images": count, "captions": len(captions), "instruct": len(instruct),
            "questions": sum(types_seen.values()), "kinds": kinds, "types": types_seen}


def write_eval(out_dir, per_type: int = 200, seed: int = 1, types=None, *, progress: bool = True) -> dict:
    """Held-out questions: scenes of ``seed`` until each type has ``per_type`` questions, at most one
    question per type from each scene. Count answers (1-6) and yes/no answers are balanced exactly.
    Writes the used images and ``questions.jsonl``; returns counts."""
    types = list(Q.QUESTION_TYPES if types is None else types)
    unknown = [t for t in types if t not in Q.QUESTION_TYPES]
    if unknown or not types:
        raise PocketVLMError(f"unknown question type(s) {unknown}; choose from {', '.join(Q.QUESTION_TYPES)}")
    if per_type < 1:
        raise PocketVLMError(f"per_type must be at least 1, got {per_type}")
    out = _prepare(out_dir)
    have = {t: 0 for t in types}
    answers: Counter = Counter()
    rows = []
    index = 0
    bar = tqdm(total=per_type * len(types), desc="eval questions", unit="q", disable=not progress)
    while min(have.values()) < per_type:
        scene = make_scene(seed, index)
        index += 1
        pick = random.Random(f"{seed}:{scene.index}:eval")
        chosen = []
        for t in types:
            options = [qa for qa in scene.qa if qa.type == t]
            if t == "count":   # the planned count question (first) is the one with uniform answers
                options = options[:1]
            if t in BALANCED:  # exactly balanced answers, not just balanced in expectation
                options = [qa for qa in options if answers[t, qa.answer] < math.ceil(per_type / len(qa.choices))]
            if have[t] < per_type and options:
                qa = pick.choice(options)
                chosen.append(qa)
                have[t] += 1
                answers[t, qa.answer] += 1
        if not chosen:
            continue
        rel = _save(scene, out)
        for qa in chosen:
            rows.append({"id": f"{scene.name}-{qa.type}", "image": rel, "question": qa.prompt(), "answer": qa.answer,
                         "type": qa.type, "answer_kind": qa.answer_kind, "choices": qa.choices})
        bar.update(len(chosen))
    bar.close()
    tmp = out / "questions.jsonl.tmp"
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    tmp.replace(out / "questions.jsonl")
    return {"images": len({r["image"] for r in rows}), "questions": len(rows), "scenes_drawn": index,
            "types": have}
