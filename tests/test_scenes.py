"""The synthetic scene generator: determinism, answers that agree with what is drawn, the file formats."""
import ast
import json
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

from pocketvlm.cli import main
from pocketvlm.errors import PocketVLMError
from pocketvlm.scenes import ANSWER_SUFFIX, QUESTION_TYPES, make_scene, write_dataset, write_eval
from pocketvlm.scenes import render as R

N = 400


@pytest.fixture(scope="module")
def scenes():
    return [make_scene(0, i) for i in range(N)]


def of_kind(scenes, kind):
    return [s for s in scenes if s.kind == kind]


def test_same_seed_and_index_give_the_same_scene():
    for i in (0, 5, 17, 123):
        a, b = make_scene(3, i), make_scene(3, i)
        assert a.image.tobytes() == b.image.tobytes() and a.caption == b.caption
        assert [(q.question, q.answer) for q in a.qa] == [(q.question, q.answer) for q in b.qa]
    assert make_scene(3, 0).image.tobytes() != make_scene(4, 0).image.tobytes()
    assert make_scene(3, 0).caption != make_scene(3, 1).caption


def test_kinds_sizes_and_question_types(scenes):
    kinds = Counter(s.kind for s in scenes)
    assert 0.45 < kinds["shapes"] / N < 0.65 and 0.17 < kinds["text"] / N < 0.33 and 0.12 < kinds["chart"] / N < 0.28
    assert {q.type for s in scenes for q in s.qa} == set(QUESTION_TYPES)
    for s in scenes:
        w, h = s.image.size
        assert s.image.mode == "RGB" and 160 <= w <= 320 and 160 <= h <= 320 and 0.75 <= w / h <= 1.33
        assert s.caption and s.qa and all(q.answer and q.question for q in s.qa)
        for q in s.qa:
            assert q.answer.lower() in [c.lower() for c in q.choices], q
            assert q.answer == q.answer.lower() or q.type == "chart"


def test_counts_are_uniform_and_match_the_drawn_objects(scenes):
    answers = Counter()
    for s in of_kind(scenes, "shapes"):
        (q,) = [q for q in s.qa if q.type == "count"]
        by, value = q.meta["by"], q.meta["value"]
        want = sum(by == "all" or getattr(o, by if by != "colour" else "colour") == value for o in s.objects)
        assert q.answer == str(want)
        answers[q.answer] += 1
        arr = np.asarray(s.image).astype(int)
        for o in s.objects:   # every listed object is drawn: its centre has its colour
            assert np.abs(arr[round(o.cy), round(o.cx)] - o.rgb).max() <= 1, (s.name, o)
    assert set(answers) == {str(k) for k in range(1, 7)}
    expect = sum(answers.values()) / 6
    assert all(0.5 * expect < n < 1.6 * expect for n in answers.values()), answers


def test_objects_do_not_overlap_and_stay_inside(scenes):
    for s in of_kind(scenes, "shapes")[:80] + of_kind(scenes, "text"):
        w, h = s.image.size
        ink = np.zeros((h, w), dtype=int)
        for o in s.objects:
            m = Image.new("L", (w, h), 0)
            R.draw_object(ImageDraw.Draw(m), R.Obj(o.shape, o.colour, o.size, o.cx, o.cy, o.r, 255))
            a = np.asarray(m)
            assert a[0].sum() == a[-1].sum() == a[:, 0].sum() == a[:, -1].sum() == 0, (s.name, o)
            ink += a > 0
        if s.text is not None:
            x0, y0, x1, y1 = s.text.bbox
            ink[y0:y1, x0:x1] += 1
        assert ink.max() <= 1, s.name
        for o in s.objects:
            assert 2 * o.r >= 0.15 * min(w, h) - 1e-6


def test_relations_agree_with_centres(scenes):
    seen = Counter()
    for s in of_kind(scenes, "shapes"):
        w, h = s.image.size
        by_desc = {o.description: o for o in s.objects}
        for q in (q for q in s.qa if q.type == "relation"):
            a, b = by_desc[q.meta["a"]], by_desc[q.meta["b"]]
            assert f"the {q.meta['a']}" in q.question.lower() and q.answer in q.choices
            dx, dy = abs(a.cx - b.cx), abs(a.cy - b.cy)
            if q.answer in ("left", "right"):
                assert dx > 1.5 * dy and dx >= 0.25 * w
                assert q.answer == ("left" if a.cx < b.cx else "right")
            else:
                assert dy > 1.5 * dx and dy >= 0.25 * h
                assert q.answer == ("above" if a.cy < b.cy else "below")
            seen[q.answer] += 1
    assert set(seen) == {"left", "right", "above", "below"}


def test_colour_shape_and_yesno_answers(scenes):
    yes = Counter()
    for s in scenes:
        for q in s.qa:
            if q.type == "colour":
                (o,) = [o for o in s.objects if o.shape == q.meta["shape"]]
                assert q.answer == o.colour
            elif q.type == "shape":
                (o,) = [o for o in s.objects if o.colour == q.meta["colour"]]
                assert q.answer == o.shape
            elif q.type == "yesno":
                present = any((o.colour, o.shape) == (q.meta["colour"], q.meta["shape"]) for o in s.objects)
                assert q.answer == ("yes" if present else "no")
                yes[q.answer] += 1
    assert yes["yes"] == yes["no"] > 0
    for s in scenes:   # object colours contrast with the background
        for o in s.objects:
            assert o.colour not in s.background.families


def test_text_is_drawn_large(scenes):
    texts = of_kind(scenes, "text")
    assert any(s.text.is_number for s in texts) and any(not s.text.is_number for s in texts)
    assert any(s.text.text.isupper() and not s.text.is_number for s in texts)
    for s in texts:
        w, h = s.image.size
        assert s.text.cap_height >= 0.18 * h
        x0, y0, x1, y1 = s.text.bbox
        assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
        box = np.asarray(s.image)[y0:y1, x0:x1].astype(int)
        ink = (np.abs(box - s.text.rgb).max(axis=-1) <= 1).mean()
        assert ink > 0.1, (s.name, ink)
        (q,) = [q for q in s.qa if q.type == "word"]
        assert q.answer == s.text.text.lower() and q.answer_kind == ("number" if s.text.is_number else "word")


def test_bitmap_font_fallback_without_freetype(monkeypatch):
    monkeypatch.setattr(R, "_font", lambda size: ImageFont.load_default_imagefont())
    R.cap_ratio.cache_clear()
    try:
        s = next(s for s in (make_scene(0, i) for i in range(50)) if s.kind == "text")
        assert s.text.cap_height >= 0.18 * s.image.size[1]
        x0, y0, x1, y1 = s.text.bbox
        box = np.asarray(s.image)[y0:y1, x0:x1].astype(int)
        assert (np.abs(box - s.text.rgb).max(axis=-1) <= 1).mean() > 0.1
    finally:
        R.cap_ratio.cache_clear()


def test_charts_answer_what_is_drawn(scenes):
    for s in of_kind(scenes, "chart"):
        arr = np.asarray(s.image).astype(int)
        heights = {}
        for b in s.bars:
            col = np.abs(arr[:, (b.x0 + b.x1) // 2] - b.rgb).max(axis=-1) <= 1
            rows = np.flatnonzero(col)
            heights[b.label] = rows.max() - rows.min() + 1
            assert heights[b.label] == b.height and rows.max() == b.bottom - 1, s.name
        top = max(heights.values())
        hs = sorted(heights.values())
        assert all(b - a >= 0.15 * top - 1 for a, b in zip(hs, hs[1:])), heights
        answers = {q.meta["asks"]: q.answer for q in s.qa}
        assert answers["tallest"] == max(heights, key=heights.get)
        assert answers["shortest"] == min(heights, key=heights.get)
        assert answers["count"] == str(len(s.bars)) and 3 <= len(s.bars) <= 5


def test_bars_drill_names_bars_by_letter_and_leaves_the_scene_alone(scenes, tmp_path):
    from pocketvlm.scenes.dataset import _keep
    charts = of_kind(scenes, "chart")[:40]
    kinds = Counter()
    for s in charts:
        kept = _keep(s, {"chart": 1.0, "bars": 1.0})
        assert [q.question for q in kept.qa[:3]] == [q.question for q in s.qa]   # the scene's own questions
        drill = [q for q in kept.qa if q.type == "bars"]
        by = {b.label: b for b in s.bars}
        heights = sorted(s.bars, key=lambda b: -b.height)
        assert Counter(q.answer for q in drill if q.answer_kind == "yesno") == {"yes": 1, "no": 1}
        for q in drill:
            kinds[q.meta["asks"]] += 1
            if q.meta["asks"] == "second":
                assert q.answer == heights[1].label
            elif q.meta["asks"] == "which":
                assert by[q.answer].colour == q.meta["colour"] and q.meta["colour"] in q.question
            elif q.meta["asks"] == "colour":
                assert q.answer == by[q.meta["label"]].colour and f"bar {q.meta['label']}" in q.question
            else:
                a, b = by[q.meta["a"]], by[q.meta["b"]]
                truth = a.height > b.height if q.meta["asks"] == "taller" else a.height < b.height
                assert (q.answer == "yes") == truth and f"bar {a.label}" in q.question
    assert set(kinds) == {"second", "which", "colour", "taller", "shorter"}
    assert all(q.type != "bars" for s in scenes for q in s.qa)   # never in the scenes themselves (eval)
    plain = write_dataset(tmp_path / "plain", 30, seed=2, types="chart", progress=False)
    drill = write_dataset(tmp_path / "drill", 30, seed=2, types="chart,bars:0.5", progress=False)
    assert drill["types"]["chart"] == plain["types"]["chart"] and 0 < drill["types"]["bars"]
    with pytest.raises(PocketVLMError, match="unknown question type"):
        write_eval(tmp_path / "ev", per_type=1, types=["bars"], progress=False)


def check_conversation(sample, out: Path):
    assert set(sample) == {"id", "image", "conversations"}
    assert (out / sample["image"]).is_file()
    turns = sample["conversations"]
    assert len(turns) >= 2 and len(turns) % 2 == 0
    for i, t in enumerate(turns):
        assert t["from"] == ("human" if i % 2 == 0 else "gpt") and t["value"].strip()
    text = "".join(t["value"] for t in turns)
    assert text.count("<image>") == 1 and turns[0]["value"].startswith("<image>\n")


def test_write_dataset_llava_format(tmp_path):
    stats = write_dataset(tmp_path, 30, seed=0, progress=False)
    assert stats["images"] == 30 and stats["captions"] == 30
    caps = json.loads((tmp_path / "captions.json").read_text())
    inst = json.loads((tmp_path / "instruct.json").read_text())
    assert len(caps) == len(inst) == 30 and len({c["id"] for c in caps}) == 30
    for c in caps:
        check_conversation(c, tmp_path)
        assert len(c["conversations"]) == 2
    for c in inst:
        check_conversation(c, tmp_path)
        assert all(t["value"].endswith(ANSWER_SUFFIX) for t in c["conversations"][::2])
        assert all(t["value"][0].isupper() or t["value"].isdigit() for t in c["conversations"][1::2])
    assert sum(len(c["conversations"]) // 2 for c in inst) == stats["questions"]
    assert Image.open(tmp_path / caps[0]["image"]).tobytes() == make_scene(0, 0).image.tobytes()


def test_write_dataset_keeps_chosen_question_types(tmp_path):
    full = write_dataset(tmp_path / "all", 40, seed=5, progress=False)
    stats = write_dataset(tmp_path / "some", 40, seed=5, types="count,word,yesno:0.5", progress=False)
    assert set(stats["types"]) <= {"count", "word", "yesno"}
    assert stats["types"]["count"] == full["types"]["count"] and stats["types"]["word"] == full["types"]["word"]
    assert 0 < stats["types"]["yesno"] < full["types"]["yesno"]
    inst = json.loads((tmp_path / "some/instruct.json").read_text())
    assert len(inst) == stats["instruct"] < 40 and stats["captions"] == 40   # chart scenes: no question left
    assert sum(len(c["conversations"]) // 2 for c in inst) == stats["questions"]
    for c in inst:
        check_conversation(c, tmp_path / "some")
    again = write_dataset(tmp_path / "again", 40, seed=5, types=["count", "word", "yesno:0.5"], progress=False)
    assert again == stats
    assert (tmp_path / "again/instruct.json").read_text() == (tmp_path / "some/instruct.json").read_text()
    for bad, msg in (("count,bogus", "unknown question type"), ("count:0", "fraction"), ("count:x", "fraction"),
                     (" , ", "no question types")):
        with pytest.raises(PocketVLMError, match=msg):
            write_dataset(tmp_path / "bad", 2, types=bad, progress=False)
    assert not (tmp_path / "bad").exists()   # checked before anything is written


def test_write_eval(tmp_path):
    stats = write_eval(tmp_path, per_type=6, progress=False)
    rows = [json.loads(line) for line in (tmp_path / "questions.jsonl").read_text().splitlines()]
    assert stats["questions"] == len(rows) == 6 * len(QUESTION_TYPES)
    assert Counter(r["type"] for r in rows) == {t: 6 for t in QUESTION_TYPES}
    assert len({r["id"] for r in rows}) == len(rows)
    images = Counter(r["image"] for r in rows)
    for r in rows:
        assert set(r) == {"id", "image", "question", "answer", "type", "answer_kind", "choices"}
        assert r["image"].startswith("images/1-") and (tmp_path / r["image"]).is_file()
        assert r["question"].endswith(ANSWER_SUFFIX) and r["answer"]
    assert all(Counter(r["type"] for r in rows if r["image"] == im).most_common(1)[0][1] == 1 for im in images)
    assert Counter(r["answer"] for r in rows if r["type"] == "count") == {str(k): 1 for k in range(1, 7)}
    assert Counter(r["answer"] for r in rows if r["type"] == "yesno") == {"yes": 3, "no": 3}
    with pytest.raises(PocketVLMError, match="unknown question type"):
        write_eval(tmp_path, per_type=1, types=["colour", "bogus"], progress=False)


def test_cli_writes_training_and_eval_files(tmp_path, capsys):
    assert main(["scenes", str(tmp_path / "train"), "--count", "8", "--no-progress"]) == 0
    assert (tmp_path / "train/captions.json").is_file() and (tmp_path / "train/instruct.json").is_file()
    assert len(list((tmp_path / "train/images").glob("0-*.png"))) == 8
    assert main(["scenes", str(tmp_path / "counts"), "--count", "8", "--types", "count", "--no-progress"]) == 0
    inst = json.loads((tmp_path / "counts/instruct.json").read_text())
    assert inst and all(len(c["conversations"]) == 2 for c in inst)   # one count question per shapes scene
    assert main(["scenes", str(tmp_path / "ev"), "--eval", "--per-type", "2", "--types", "word,chart",
                 "--no-progress"]) == 0
    assert len((tmp_path / "ev/questions.jsonl").read_text().splitlines()) == 4
    assert "wrote" in capsys.readouterr().out
    assert main(["scenes", str(tmp_path / "bad"), "--eval", "--types", "nope", "--no-progress"]) == 2


def test_imports_only_errors_from_pocketvlm():
    pkg = Path(R.__file__).parent
    for f in pkg.glob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level >= 2:
                assert node.module == "errors", (f.name, node.module)
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                assert not node.module.startswith("pocketvlm") or node.module == "pocketvlm.errors"
            if isinstance(node, ast.Import):
                assert all(a.name.split(".")[0] in {"json", "math", "random", "numpy", "PIL", "tqdm"} for a in node.names)
        assert len(f.read_text().splitlines()) <= 600
    assert math.isclose(R.cap_ratio(), R.text_mask("H", 100).height / 100)
