"""Batch jobs on Ray Data (a local Ray with 2 CPUs, started once for the module): the same greedy answers as
the local runner, resume across runners, and an actor killed mid-job loses no row."""
import json
import os
import signal
import sys
import threading
import time

import pytest
import ray
import ray.data  # the test extra installs ray[data]: a missing or broken Ray fails here rather than skipping

from pocketvlm.batch import Answerer, run

from test_batch import PROMPT, answers, lines, write_images


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(sys.path)}})
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from serve_fixtures import make_tiny_llava

    return make_tiny_llava(tmp_path_factory.mktemp("batch-ray") / "llava")


def job(tiny, inp, out, **kw):
    kw = {"task": "ask", "prompt": PROMPT, "max_tokens": 5, "progress": False, "batch_size": 3, **kw}
    return run(inp, out, load={"source": str(tiny), "context_window_size": 256}, **kw)


def test_ray_gives_the_local_answers_and_error_rows(tmp_path, tiny, local_ray):
    imgs = write_images(tmp_path / "imgs", n=9, seed=3)
    (imgs / "broken.png").write_bytes(b"not an image")
    local = job(tiny, imgs, tmp_path / "local.jsonl")
    on_ray = job(tiny, imgs, tmp_path / "ray.jsonl", ray=True, actors=2)
    assert (on_ray.answered, on_ray.errors) == (local.answered, local.errors) == (9, 1)
    assert answers(tmp_path / "ray.jsonl") == answers(tmp_path / "local.jsonl")
    row = next(r for r in lines(tmp_path / "ray.jsonl") if "answer" in r)
    assert set(row) == {"id", "image", "prompt", "answer", "image_ms", "encode_ms", "generate_ms", "total_ms"}
    assert not (tmp_path / "ray.jsonl.shards").exists()  # merged into OUT, then removed


def test_ray_resumes_a_local_run_and_an_interrupted_ray_run(tmp_path, tiny, local_ray):
    imgs = write_images(tmp_path / "imgs", n=6, seed=4)
    m = tmp_path / "m.jsonl"
    rows = [json.dumps({"id": f"r{i}", "image": str(p)}) for i, p in enumerate(sorted(imgs.rglob("*.png")))]
    m.write_text("\n".join(rows[:2]) + "\n")
    out = tmp_path / "o.jsonl"
    job(tiny, m, out)
    # An interrupted Ray run left a shard (Ray Data's JSONL) behind, its last line torn.
    shard = tmp_path / "o.jsonl.shards" / "run-1" / "0.json"
    shard.parent.mkdir(parents=True)
    shard.write_text('{"id":"r2","image":"x","prompt":"What is it?","answer":"kept","error":null}\n{"id":"r3","ima')
    m.write_text("\n".join(rows) + "\n")
    stats = job(tiny, m, out, ray=True, actors=2)
    assert (stats.skipped, stats.answered) == (3, 3)  # r2 joined OUT from the shard; r3..r5 answered now
    assert sorted(r["id"] for r in lines(out)) == [f"r{i}" for i in range(6)]
    assert answers(out)["r2"] == "kept" and not (tmp_path / "o.jsonl.shards").exists()
    with pytest.raises(Exception, match="another job"):
        job(tiny, m, out, ray=True, prompt="Other?")


class SlowAnswerer(Answerer):
    """Writes its process id where the test can find it, and takes its time, so that one can be killed."""

    def __init__(self, *a, pid_dir=None, **kw):
        super().__init__(*a, **kw)
        open(os.path.join(pid_dir, str(os.getpid())), "w").close()

    def answer(self, rows):
        time.sleep(0.3)
        return super().answer(rows)


def test_killing_an_actor_loses_no_rows(tmp_path, tiny, local_ray):
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the actors cannot import this test module
    imgs = write_images(tmp_path / "imgs", n=30, seed=5)
    pids = tmp_path / "pids"
    pids.mkdir()
    killed = []

    def kill_one():
        deadline = time.time() + 60
        while time.time() < deadline and len(list(pids.iterdir())) < 2:
            time.sleep(0.1)
        time.sleep(1.0)  # both actors busy with their batches
        pid = int(sorted(pids.iterdir())[0].name)
        os.kill(pid, signal.SIGKILL)
        killed.append(pid)

    class Slow(SlowAnswerer):
        def __init__(self, *a, **kw):
            super().__init__(*a, pid_dir=str(pids), **kw)

    t = threading.Thread(target=kill_one)
    t.start()
    stats = job(tiny, imgs, tmp_path / "o.jsonl", ray=True, actors=2, batch_size=2, answerer_cls=Slow)
    t.join()
    assert killed and len(list(pids.iterdir())) >= 3  # an actor died and Ray Data started another
    assert (stats.answered, stats.errors) == (30, 0)
    ids = [r["id"] for r in lines(tmp_path / "o.jsonl")]
    assert len(ids) == len(set(ids)) == 30
    local = job(tiny, imgs, tmp_path / "local.jsonl")
    assert local.answered == 30 and answers(tmp_path / "o.jsonl") == answers(tmp_path / "local.jsonl")
