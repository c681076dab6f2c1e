"""The VQA evaluation harness: answer matching, statistics, data checks, blind mode, and `pocketvlm eval` end to end."""
import json

import pytest
from PIL import Image

from pocketvlm.errors import DataError, PocketVLMError
from pocketvlm.eval import EvalResult, evaluate, load_questions, run_eval
from pocketvlm.eval.matching import match, normalize, parse_number, parse_option, parse_yesno
from pocketvlm.eval.vqa import BLANK_RGB, by_image, wilson_interval


# --- matching -----------------------------------------------------------------------------------------

def test_normalize():
    assert normalize("  The GREY Circle!! ") == "gray circle"
    assert normalize("an apple, a pear.") == "apple pear"
    assert normalize("...") == ""
    assert normalize("A.") == "a" and normalize("the") == "the"  # a label, not an article


@pytest.mark.parametrize("pred,answer,correct", [
    ("red", "red", True), ("Red.", "red", True), ("RED", "red", True), ("The red one", "red", True),
    ("red circle", "red", True), ("It is red", "red", False), ("grey", "gray", True), ("Gray!", "grey", True),
    ("bar chart", "bar chart", True), ("Bar chart, clearly.", "bar chart", True), ("bar", "bar chart", False),
    ("reddish", "red", False), ("blue", "red", False), ("A square.", "square", True), ("A.", "A", True),
    ("A bar", "A", False), ("B", "A", False),
])
def test_match_word(pred, answer, correct):
    parsed, ok = match(pred, answer, "word")
    assert parsed is not None and ok is correct


@pytest.mark.parametrize("pred", ["", "   ", "...", None])
def test_match_word_parse_failure(pred):
    assert match(pred, "red", "word") == (None, False)


@pytest.mark.parametrize("pred,parsed", [
    ("yes", "yes"), ("Yes.", "yes"), ("NO", "no"), ("No, it is not.", "no"), ("I think yes", "yes"),
    ("yes and no", "yes"), ("Answer: no!", "no"), ("nope", None), ("maybe", None), ("", None), ("yesterday", None),
])
def test_parse_yesno(pred, parsed):
    assert parse_yesno(pred) == parsed
    assert match(pred, "yes", "yesno") == (parsed, parsed == "yes")


@pytest.mark.parametrize("pred,parsed", [
    ("3", 3), ("3.", 3), ("There are 3 circles.", 3), ("three", 3), ("Three.", 3), ("twenty", 20),
    ("zero", 0), ("I count 12 and then 4", 12), ("four or 5", 4), ("1,024", 1024), ("07", 7),
    ("none", None), ("many", None), ("", None), ("someone", None),
])
def test_parse_number(pred, parsed):
    assert parse_number(pred) == parsed
    assert match(pred, "3", "number") == (parsed, parsed == 3)


@pytest.mark.parametrize("pred,parsed", [
    ("B", "B"), ("b", "B"), ("(B)", "B"), ("B.", "B"), ("B)", "B"), ("[C]", "C"), ("Option B", "B"),
    ("option d", "D"), ("The answer is B", "B"), ("the answer is (c).", "C"), ("Answer: E", "E"),
    ("B) a blue square", "B"), ("(d) red", "D"), ("C. green", "C"), ("I think D is right", "D"), ("A", "A"),
    ("A.", "A"), ("The correct choice is E.", "E"),
    ("A red circle", None), ("The answer is a circle", None), ("blue", None), ("", None), ("F", None),
])
def test_parse_option(pred, parsed):
    assert parse_option(pred) == parsed
    assert match(pred, "B", "option") == (parsed, parsed == "B")


@pytest.mark.parametrize("pred,parsed", [
    ("right", "right"), ("Right.", "right"), ("On the right", "right"), ("to the LEFT", "left"),
    ("the right one, not left", "right"), ("B", None), ("up", None), ("", None), ("rightmost", None),
])
def test_option_named_by_its_choices(pred, parsed):
    assert match(pred, "right", "option", ["left", "right"]) == (parsed, parsed == "right")


@pytest.mark.parametrize("pred,parsed", [("(B)", "B"), ("green", "B"), ("It is green.", "B"), ("dark blue", "D"),
                                         ("blue", "C"), ("purple", None)])
def test_letter_option_answered_with_the_choice_text(pred, parsed):
    assert match(pred, "B", "option", ["red", "green", "blue", "dark blue"]) == (parsed, parsed == "B")


# --- statistics ---------------------------------------------------------------------------------------

def test_wilson_interval():
    lo, hi = wilson_interval(8, 10)  # the textbook case: 0.4902 .. 0.9433
    assert lo == pytest.approx(0.4902, abs=1e-4) and hi == pytest.approx(0.9433, abs=1e-4)
    lo, hi = wilson_interval(0, 20)
    assert lo == 0.0 and hi == pytest.approx(0.1611, abs=1e-4)
    assert wilson_interval(20, 20)[1] == 1.0 and wilson_interval(20, 20)[0] == pytest.approx(0.8389, abs=1e-4)
    assert wilson_interval(0, 0) == (0.0, 1.0)


# --- data ---------------------------------------------------------------------------------------------

COLOURS = ["red", "green", "blue"]


def write_set(d, rows=None, images=None):
    """A small question file: three images, questions of several types and kinds."""
    d.mkdir(parents=True, exist_ok=True)
    images = images or {"red.png": ((40, 30), "red"), "green.png": ((24, 36), "green"), "blue.png": ((32, 32), "blue")}
    for name, (size, colour) in images.items():
        Image.new("RGB", size, colour).save(d / name)
    if rows is None:
        rows = []
        for name, (_, colour) in images.items():  # interleaved so grouping by image changes the order
            rows.append({"id": f"{colour}-c", "image": name, "question": "What colour is the picture?",
                         "answer": colour, "type": "colour", "answer_kind": "word", "choices": COLOURS})
        for name, (_, colour) in images.items():
            rows.append({"id": f"{colour}-y", "image": name, "question": "Is it red?",
                         "answer": "yes" if colour == "red" else "no", "type": "yesno", "answer_kind": "yesno",
                         "choices": ["yes", "no"]})
            rows.append({"id": f"{colour}-n", "image": str((d / name).resolve()), "question": "How many shapes?",
                         "answer": 0, "type": "count", "answer_kind": "number"})
            rows.append({"id": f"{colour}-o", "image": name, "question": "Which? A) red B) green C) blue D) gray",
                         "answer": "ABC"[COLOURS.index(colour)], "type": "option", "answer_kind": "option",
                         "choices": ["A", "B", "C", "D"]})
    f = d / "questions.jsonl"
    f.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return f


def test_load_questions(tmp_path):
    f = write_set(tmp_path)
    qs = load_questions(f)
    assert len(qs) == 12 and load_questions(tmp_path) == qs  # a folder means its questions.jsonl
    assert qs[0].image == (tmp_path / "red.png").resolve() and qs[0].choices == tuple(COLOURS)
    assert qs[4].answer == "0" and qs[4].chance is None and qs[3].chance == 0.5
    as_list = tmp_path / "list.json"
    as_list.write_text(json.dumps([json.loads(line) for line in f.read_text().splitlines()]))
    assert load_questions(as_list) == [q.__class__(**{**q.__dict__, "line": i + 1}) for i, q in enumerate(qs)]


GOOD = {"id": "q1", "image": "red.png", "question": "Colour?", "answer": "red", "type": "colour",
        "answer_kind": "word"}


@pytest.mark.parametrize("row,needle", [
    ({**GOOD, "type": "texture"}, "unknown type 'texture'"),
    ({**GOOD, "answer_kind": "essay"}, "unknown answer_kind 'essay'"),
    ({k: v for k, v in GOOD.items() if k != "answer"}, "missing field(s) answer"),
    ({**GOOD, "question": ""}, "missing field(s) question"),
    ({**GOOD, "image": "nowhere.png"}, "nowhere.png' does not exist"),
    ({**GOOD, "answer_kind": "number", "answer": "many"}, "is not an integer"),
    ({**GOOD, "answer_kind": "option", "answer": "Z"}, "is not a letter A-E or one of its choices"),
    ({**GOOD, "answer_kind": "option", "answer": "up", "choices": ["left", "right"]}, "is not a letter A-E"),
    ({**GOOD, "choices": "red"}, "choices must be a non-empty list"),
    ('{"id": "q1", "image": ', "line 2: not valid JSON"),
    ("[1, 2]", "expected a JSON object"),
])
def test_bad_rows_name_the_line(tmp_path, row, needle):
    f = write_set(tmp_path, rows=[{**GOOD, "id": "q0"}, row])
    with pytest.raises(DataError) as e:
        load_questions(f)
    assert needle in str(e.value) and "line 2" in str(e.value)
    if isinstance(row, dict) and "id" in row:
        assert "id 'q1'" in str(e.value)
    assert isinstance(e.value, PocketVLMError)


def test_bad_files(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_questions(tmp_path / "missing.jsonl")
    with pytest.raises(DataError, match="already used on line 1"):
        load_questions(write_set(tmp_path / "dup", rows=[GOOD, GOOD]))
    with pytest.raises(DataError, match="no questions"):
        load_questions(write_set(tmp_path / "empty", rows=[""]))
    (tmp_path / "bad.json").write_text("[{]")
    with pytest.raises(DataError, match="not valid JSON"):
        load_questions(tmp_path / "bad.json")


# --- evaluation with fake models ----------------------------------------------------------------------

def colour_of(image):
    return {(255, 0, 0): "red", (0, 128, 0): "green", (0, 0, 255): "blue"}.get(image.getpixel((0, 0)), "gray")


@pytest.fixture()
def qs(tmp_path):
    return load_questions(write_set(tmp_path))


def test_oracle_and_constant_answers(qs):
    oracle = evaluate(lambda img, text: {"colour": colour_of(img), "yesno": "Yes." if colour_of(img) == "red" else "No.",
                                         "count": "zero", "option": f"({'ABC'[COLOURS.index(colour_of(img))]})"}
                      [next(q.type for q in qs if q.question == text)], qs, progress=False)
    assert oracle.overall.correct == 12 and oracle.overall.parse_failures == 0
    red = evaluate(lambda img, text: "red", qs, progress=False)
    per = red.per_type
    assert list(per) == ["colour", "count", "yesno", "option"]  # the known types' order
    assert (per["colour"].n, per["colour"].correct, per["colour"].parse_failure_rate) == (3, 1, 0.0)
    assert per["colour"].accuracy == pytest.approx(1 / 3) and per["colour"].chance == pytest.approx(1 / 3)
    assert (per["yesno"].correct, per["yesno"].parse_failures, per["yesno"].chance) == (0, 3, 0.5)
    assert (per["count"].parse_failures, per["count"].chance) == (3, None)
    assert per["option"].chance == 0.25 and per["option"].parse_failures == 3
    o = red.overall
    assert (o.n, o.correct, o.parse_failures) == (12, 1, 9)
    assert o.chance == pytest.approx((3 / 3 + 3 / 2 + 3 / 4) / 9)  # over the 9 questions that give choices
    assert o.ci95 == wilson_interval(1, 12)
    assert [r.id for r in red.records] == [q.id for q in qs]  # file order, whatever order they ran in
    assert red.records[4].parsed is None and red.records[0].parsed == "red"
    d = json.loads(red.to_json())
    assert d["overall"]["n"] == 12 and len(d["records"]) == 12
    assert set(d["records"][0]) >= {"id", "type", "question", "answer", "prediction", "parsed", "correct"}
    table = red.table()
    assert "overall" in table and "33.3 [" in table and "colour" in table


def test_questions_run_grouped_by_image(qs):
    seen = []
    evaluate(lambda img, text: seen.append(colour_of(img)) or "red", qs, progress=False)
    assert seen == ["red"] * 4 + ["green"] * 4 + ["blue"] * 4
    assert [[qs[i].id for i in g][:2] for _, g in by_image(qs)] == [["red-c", "red-y"], ["green-c", "green-y"],
                                                                     ["blue-c", "blue-y"]]


def test_blind_mode_passes_a_gray_image_of_the_same_size(qs):
    seen = []

    def fake(img, text):
        seen.append((img.size, img.mode, img.getextrema()))
        return colour_of(img)

    real = evaluate(fake, qs, progress=False)
    sizes = [s for s, _, _ in seen]
    seen.clear()
    blind = evaluate(fake, qs, progress=False, blind=True)
    assert [s for s, _, _ in seen] == sizes == [(40, 30)] * 4 + [(24, 36)] * 4 + [(32, 32)] * 4
    assert all(mode == "RGB" and ext == tuple((c, c) for c in BLANK_RGB) for _, mode, ext in seen)
    assert real.per_type["colour"].correct == 3 and blind.per_type["colour"].correct == 0 and blind.blind


def test_limit_per_type_and_run_eval(qs):
    r = evaluate(lambda img, text: "red", qs, progress=False, per_type=2)
    assert {t: s.n for t, s in r.per_type.items()} == {"colour": 2, "count": 2, "yesno": 2, "option": 2}
    assert evaluate(lambda img, text: "red", qs, progress=False, per_type=2, limit=3).overall.n == 3
    report = run_eval(lambda img, text: colour_of(img), qs, progress=False)
    assert isinstance(report.model, EvalResult) and report.blind.blind
    d = json.loads(report.to_json())
    assert d["gap_to_blind"]["colour"] == pytest.approx(1.0) and d["blind"]["per_type"]["colour"]["correct"] == 0
    table = report.table()
    assert "blind %" in table and "+100.0" in table and "gap to blind" in table
    assert run_eval(lambda img, text: "red", qs, blind=False, progress=False).blind is None


# --- end to end with a tiny random LLaVA ---------------------------------------------------------------

def test_pocketvlm_eval_cli_end_to_end(tmp_path, capsys):
    import pocketvlm
    from pocketvlm.cli import main
    from pocketvlm.eval import pocketvlm_answerer

    from serve_fixtures import make_tiny_llava

    model_dir = make_tiny_llava(tmp_path / "llava")
    data = write_set(tmp_path / "data")
    out = tmp_path / "out" / "report.json"
    rc = main(["eval", str(model_dir), "--data", str(data), "--json", str(out), "--max-tokens", "4",
               "--context-window-size", "256", "--no-progress"])
    assert rc == 0
    table = capsys.readouterr().out
    assert "gap to blind" in table and "overall" in table
    d = json.loads(out.read_text())
    assert d["data"] == str(data) and d["max_tokens"] == 4
    for run, blind in [(d["model"], False), (d["blind"], True)]:
        assert run["blind"] is blind and run["overall"]["n"] == 12 and len(run["records"]) == 12
        assert sum(s["n"] for s in run["per_type"].values()) == 12
        fails = sum(r["parsed"] is None for r in run["records"])
        assert run["overall"]["parse_failures"] == fails
        assert sum(s["parse_failures"] for s in run["per_type"].values()) == fails
        assert all(isinstance(r["prediction"], str) for r in run["records"])
    assert set(d["gap_to_blind"]) == {"colour", "count", "yesno", "option", "overall"}

    # Prefix reuse between questions does not change the answers (each question is a fresh conversation).
    model = pocketvlm.load(model_dir, context_window_size=256)
    qs = load_questions(data)[:6]
    reused = evaluate(pocketvlm_answerer(model, max_tokens=4), qs, progress=False)
    fresh = evaluate(pocketvlm_answerer(model, max_tokens=4, reuse_prefix=False), qs, progress=False)
    assert [r.prediction for r in reused.records] == [r.prediction for r in fresh.records]
    assert [r["prediction"] for r in d["model"]["records"][:6]] == [r.prediction for r in fresh.records]


def test_cli_bad_data_fails_before_loading_the_model(tmp_path, capsys):
    from pocketvlm.cli import main

    f = write_set(tmp_path, rows=[{**GOOD, "type": "texture"}])
    assert main(["eval", str(tmp_path / "no-model-here"), "--data", str(f)]) == 2
    assert "unknown type 'texture'" in capsys.readouterr().err


def test_default_data_is_the_generated_scenes_set(tmp_path, monkeypatch):
    pytest.importorskip("pocketvlm.scenes")
    from pocketvlm.eval.cli import default_data

    monkeypatch.setenv("POCKETVLM_CACHE", str(tmp_path))
    d = default_data(2)
    assert d == tmp_path / "scenes-eval-seed1-2"
    qs = load_questions(d)  # the generator's rows pass every check
    assert len(qs) >= 2 and {q.type for q in qs} <= {"colour", "shape", "count", "relation", "word", "chart", "yesno"}
    mtime = (d / "questions.jsonl").stat().st_mtime_ns
    assert default_data(2) == d and (d / "questions.jsonl").stat().st_mtime_ns == mtime  # made once
    assert [p.name for p in tmp_path.iterdir()] == [d.name]  # no temporary folder left behind


def test_no_data_and_no_scene_generator_is_a_clear_error(tmp_path, monkeypatch, capsys):
    import sys

    from pocketvlm.cli import main

    monkeypatch.setenv("POCKETVLM_CACHE", str(tmp_path))
    monkeypatch.setitem(sys.modules, "pocketvlm.scenes", None)  # import fails
    assert main(["eval", "some-model"]) == 2
    assert "pass --data PATH" in capsys.readouterr().err
