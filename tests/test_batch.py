"""Batch jobs, local runner: inputs, the bounded pipeline, batched vision encoding, resume, the job identity,
error rows and every bad input (the Ray runner: test_batch_ray.py)."""
import json
import sys
import threading

import numpy as np
import pytest
from PIL import Image

from pocketvlm.batch import Answerer, read_rows, run
from pocketvlm.batch.pipeline import batched, prefetch
from pocketvlm.errors import DataError, DependencyError

PROMPT = "What is it?"


def write_images(d, n=6, seed=0):
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        sub = d / ("sub" if i % 2 else "")
        sub.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (20 + 3 * i, 30, 3), dtype=np.uint8)).save(sub / f"img{i}.png")
    return d


def lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def answers(path):
    return {r["id"]: r.get("answer", r.get("error")) for r in lines(path)}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from serve_fixtures import make_tiny_llava

    return make_tiny_llava(tmp_path_factory.mktemp("batch") / "llava")


@pytest.fixture(scope="module")
def model(tiny):
    import pocketvlm

    return pocketvlm.load(tiny, context_window_size=256)


def job(model, inp, out, **kw):
    kw = {"task": "ask", "prompt": PROMPT, "max_tokens": 5, "progress": False, **kw}
    return run(inp, out, model=model, **kw)


# --- inputs -------------------------------------------------------------------------------------------

def test_folder_manifests_and_their_bad_rows(tmp_path):
    imgs = write_images(tmp_path / "imgs", n=3)
    (imgs / "notes.txt").write_text("not an image")
    assert [(r["id"], r["prompt"]) for r in read_rows(imgs, "p")] == [
        ("img0.png", "p"), ("img2.png", "p"), ("sub/img1.png", "p")]
    m = tmp_path / "m.jsonl"
    m.write_text('{"id": "a", "image": "imgs/img0.png", "prompt": "own"}\n{"image": "/x/y.png"}\n\n'
                 '{"image": "imgs/img2.png"\n{"id": "c"}\n{"image": "https://example.com/p.jpg"}\n')
    rows = list(read_rows(m, "p"))
    assert [r["id"] for r in rows] == ["a", "line-2", "line-4", "c", "line-6"]
    assert rows[0] == {"id": "a", "image": str(imgs / "img0.png"), "prompt": "own"}
    assert rows[1]["image"] == "/x/y.png" and rows[4]["image"] == "https://example.com/p.jpg"
    assert "line 4: not valid JSON" in rows[2]["error"] and "needs an 'image'" in rows[3]["error"]
    c = tmp_path / "m.csv"
    c.write_text("image,prompt\nimgs/img0.png,\nimgs/sub/img1.png,How many?\n")
    assert [(r["id"], r["image"], r["prompt"]) for r in read_rows(c, "p")] == [
        ("line-2", str(imgs / "img0.png"), "p"), ("line-3", str(imgs / "sub" / "img1.png"), "How many?")]
    (tmp_path / "bad.csv").write_text("path\nx.png\n")
    with pytest.raises(DataError, match="'image' column"):
        list(read_rows(tmp_path / "bad.csv", "p"))


def test_missing_and_unusable_inputs(tmp_path, model, capsys):
    from pocketvlm.cli import main

    with pytest.raises(DataError, match="does not exist"):
        job(model, tmp_path / "nowhere", tmp_path / "o.jsonl")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no image files"):
        job(model, tmp_path / "empty", tmp_path / "o.jsonl")
    (tmp_path / "m.json").write_text("[]")
    with pytest.raises(DataError, match="neither a folder nor"):
        job(model, tmp_path / "m.json", tmp_path / "o.jsonl")
    (tmp_path / "dup.jsonl").write_text('{"id": 1, "image": "a.png"}\n{"id": "1", "image": "b.png"}\n')
    with pytest.raises(DataError, match="appears twice"):
        job(model, tmp_path / "dup.jsonl", tmp_path / "o.jsonl")
    assert main(["batch", "caption", str(tmp_path / "nowhere"), "-o", str(tmp_path / "o.jsonl")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "o.jsonl").exists()  # nothing written for a job that never started


def test_dataset_on_disk(tmp_path, model):
    datasets = pytest.importorskip("datasets")
    imgs = write_images(tmp_path / "imgs", n=3)
    files = sorted(imgs.rglob("*.png"))
    ds = datasets.Dataset.from_dict({"image": [str(f) for f in files], "id": [f.stem for f in files]})
    ds.cast_column("image", datasets.Image()).save_to_disk(str(tmp_path / "ds"))
    rows = list(read_rows(tmp_path / "ds", PROMPT))
    assert [r["id"] for r in rows] == ["img0", "img2", "img1"] and all(r["data"] for r in rows)
    job(model, tmp_path / "ds", tmp_path / "ds.jsonl")
    job(model, imgs, tmp_path / "folder.jsonl")
    by_stem = {k.rsplit("/", 1)[-1].removesuffix(".png"): v for k, v in answers(tmp_path / "folder.jsonl").items()}
    assert answers(tmp_path / "ds.jsonl") == by_stem
    assert "data" not in lines(tmp_path / "ds.jsonl")[0]  # the image bytes stay out of the output


# --- the pipeline -------------------------------------------------------------------------------------

def test_prefetch_keeps_order_bounds_the_queue_and_raises_in_place():
    made = []

    def slow_square(x):
        made.append(x)
        return x * x

    it = prefetch(range(100), slow_square, depth=3)
    assert next(it) == 0
    threading.Event().wait(0.2)
    assert len(made) <= 6  # bounded: the thread waits for the consumer
    assert list(it) == [x * x for x in range(1, 100)]

    def fail_at_3(x):
        if x == 3:
            raise ValueError("three")
        return x

    got = []
    with pytest.raises(ValueError, match="three"):
        for v in prefetch(range(10), fail_at_3):
            got.append(v)
    assert got == [0, 1, 2]
    assert list(batched(range(7), 3)) == [[0, 1, 2], [3, 4, 5], [6]]


# --- answers ------------------------------------------------------------------------------------------

def test_batched_vision_tower_gives_the_one_by_one_answers(tmp_path, model):
    imgs = write_images(tmp_path / "imgs", n=7, seed=7)  # images no other test has put in the cache
    encoded = model.images_encoded
    stats = job(model, imgs, tmp_path / "b4.jsonl", batch_size=4)
    assert (stats.answered, stats.errors, stats.skipped) == (7, 0, 0)
    assert model.images_encoded - encoded == 7  # once each, in batches; the chat found them in the cache
    job(model, imgs, tmp_path / "b1.jsonl", batch_size=1)
    assert answers(tmp_path / "b4.jsonl") == answers(tmp_path / "b1.jsonl")
    # ... and what one plain chat per image answers, each in a fresh conversation
    for row in lines(tmp_path / "b4.jsonl"):
        model.reset()
        content = [{"type": "image_url", "image_url": {"url": row["image"]}}, {"type": "text", "text": PROMPT}]
        assert model.chat([{"role": "user", "content": content}], temperature=0, max_tokens=5) == row["answer"]
        assert row["prompt"] == PROMPT and row["total_ms"] >= row["generate_ms"] > 0
        assert set(row) == {"id", "image", "prompt", "answer", "image_ms", "encode_ms", "generate_ms", "total_ms"}


def test_a_bad_image_is_an_error_row_and_the_job_goes_on(tmp_path, model):
    imgs = write_images(tmp_path / "imgs", n=4)
    (imgs / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (imgs / "empty.jpg").write_bytes(b"")
    stats = job(model, imgs, tmp_path / "o.jsonl", batch_size=2)
    assert (stats.answered, stats.errors) == (4, 2)
    rows = {r["id"]: r for r in lines(tmp_path / "o.jsonl")}
    assert len(rows) == 6 and "answer" not in rows["broken.png"]
    assert "ImageError" in rows["broken.png"]["error"] and "not an image" in rows["empty.jpg"]["error"]


def test_urls_are_refused_unless_allowed_and_then_only_public_hosts(tmp_path, model):
    m = tmp_path / "m.jsonl"
    m.write_text('{"id": "u", "image": "http://example.com/cat.jpg"}\n'
                 '{"id": "l", "image": "http://127.0.0.1:9/x.png"}\n')
    job(model, m, tmp_path / "off.jsonl")
    rows = {r["id"]: r["error"] for r in lines(tmp_path / "off.jsonl")}
    assert all("remote image URLs are off" in e and "--allow-remote-images" in e for e in rows.values())
    m.write_text('{"id": "l", "image": "http://127.0.0.1:9/x.png"}\n')  # no DNS, no connection: refused first
    job(model, m, tmp_path / "on.jsonl", allow_remote_images=True)
    assert "'127.0.0.1': it is a non-public address" in answers(tmp_path / "on.jsonl")["l"]


# --- resume, Ctrl-C and the job identity --------------------------------------------------------------

def test_resume_skips_done_rows_and_cuts_a_torn_line(tmp_path, model):
    imgs = write_images(tmp_path / "imgs", n=6)
    m = tmp_path / "m.jsonl"
    rows = [json.dumps({"id": f"r{i}", "image": str(p)}) for i, p in enumerate(sorted(imgs.rglob("*.png")))]
    m.write_text("\n".join(rows[:4]) + "\n")
    out = tmp_path / "o.jsonl"
    assert job(model, m, out).answered == 4
    first = answers(out)
    with open(out, "a") as f:
        f.write('{"id": "r4", "image": "torn')  # killed mid-write
    m.write_text("\n".join(rows) + "\n")
    encoded = model.images_encoded
    stats = job(model, m, out)
    assert (stats.skipped, stats.answered) == (4, 2) and model.images_encoded - encoded <= 2
    assert [r["id"] for r in lines(out)] == [f"r{i}" for i in range(6)]  # every line valid, none twice
    assert {k: v for k, v in answers(out).items() if k in first} == first
    assert job(model, m, out).answered == 0  # all done: nothing to do


def test_ctrl_c_leaves_complete_lines_and_the_rerun_finishes(tmp_path, model):
    imgs = write_images(tmp_path / "imgs", n=6)

    class Interrupted(Answerer):
        calls = 0

        def answer(self, rows):
            Interrupted.calls += 1
            if Interrupted.calls == 2:
                raise KeyboardInterrupt
            return super().answer(rows)

    out = tmp_path / "o.jsonl"
    with pytest.raises(KeyboardInterrupt):
        job(model, imgs, out, batch_size=2, answerer_cls=Interrupted)
    assert len(lines(out)) == 2
    stats = job(model, imgs, out, batch_size=2)
    assert (stats.skipped, stats.answered) == (2, 4) and len(lines(out)) == 6


def test_another_job_is_refused(tmp_path, model, tiny):
    imgs = write_images(tmp_path / "imgs", n=2)
    out = tmp_path / "o.jsonl"
    job(model, imgs, out)
    ident = json.loads((tmp_path / "o.jsonl.job.json").read_text())
    assert ident["prompt"] == PROMPT and ident["task"] == "ask" and ident["model"]["source"] == str(tiny)
    with pytest.raises(DataError, match="another job's answers.*prompt"):
        job(model, imgs, out, prompt="Something else?")
    with pytest.raises(DataError, match="max_tokens"):
        job(model, imgs, out, max_tokens=9)
    with pytest.raises(DataError, match="model"):
        job(model, imgs, out, load={"source": "some/other-model"})
    with pytest.raises(DataError, match="task"):
        job(model, imgs, out, task="caption", prompt=PROMPT)
    m = tmp_path / "m.jsonl"  # the same ids, asked with their own prompt
    m.write_text("".join(json.dumps({"id": r["id"], "image": r["image"], "prompt": "Own?"}) + "\n"
                         for r in lines(out)))
    with pytest.raises(DataError, match="another job"):
        job(model, m, out)
    other = tmp_path / "notes.jsonl"
    other.write_text('{"something": "else"}\n')
    with pytest.raises(DataError, match="not a pocketvlm batch output"):
        job(model, imgs, other)
    assert other.read_text() == '{"something": "else"}\n'


def test_ray_not_installed_names_the_extra(tmp_path, model, monkeypatch, capsys):
    from pocketvlm.cli import main

    imgs = write_images(tmp_path / "imgs", n=1)
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    monkeypatch.setitem(sys.modules, "ray.data", None)
    with pytest.raises(DependencyError, match=r"pocketvlm\[ray\]"):
        job(model, imgs, tmp_path / "o.jsonl", ray=True)
    assert main(["batch", "caption", str(imgs), "-o", str(tmp_path / "c.jsonl"), "--ray"]) == 2
    assert "pip install 'pocketvlm[ray]'" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.jsonl*"))  # refused before anything was written


def test_cli_caption_end_to_end(tmp_path, tiny, capsys):
    from pocketvlm.cli import main

    imgs = write_images(tmp_path / "imgs", n=3)
    out = tmp_path / "o.jsonl"
    argv = ["batch", "caption", str(imgs), "-o", str(out), "--model", str(tiny), "--max-tokens", "4",
            "--context-window-size", "256", "--batch-size", "2", "--no-progress"]
    assert main(argv) == 0
    assert "3 answered, 0 error rows" in capsys.readouterr().err
    assert {r["prompt"] for r in lines(out)} == {"Describe the image briefly."} and len(lines(out)) == 3
    assert main(argv) == 0 and "3 already done" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["batch", "ask", str(imgs), "-o", str(out)])  # argparse: ask needs --prompt
    assert main(["batch", "caption", str(imgs), "-o", str(tmp_path / "x.jsonl"), "--actors", "2"]) == 2
    assert "add --ray" in capsys.readouterr().err
