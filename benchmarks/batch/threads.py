"""Local runner with N torch threads on 12 of the 100 scenes (the 2 whose answers differed from Ray first):
answers vs the Ray run's, CPU s/image and wall s/image (model loaded first; 2 images to warm up)."""
import json, sys, time
from pathlib import Path
import torch
threads = int(sys.argv[1])
torch.set_num_threads(threads)
import pocketvlm
from pocketvlm.batch import run

D = Path("/tmp/bt/meas")
ray_rows = {r["id"]: r for r in map(json.loads, open(D / "ray.jsonl"))}
ids = ["2-33.png", "2-58.png"] + [k for k in sorted(ray_rows) if k not in ("2-33.png", "2-58.png")][:10]
d = D / f"t{threads}"; d.mkdir(exist_ok=True)
for f in d.glob("*"):
    f.unlink()
(d / "warm.jsonl").write_text("".join(json.dumps({"id": i, "image": str(D / "s100" / i)}) + "\n" for i in ids[-2:]))
(d / "m.jsonl").write_text("".join(json.dumps({"id": i, "image": str(D / "s100" / i)}) + "\n" for i in ids))
model = pocketvlm.load("pocketvlm-scenes")
kw = dict(task="ask", prompt="How many shapes are there?", max_tokens=8, model=model, progress=False)
run(d / "warm.jsonl", d / "warm-out.jsonl", **kw)
c, t = time.process_time(), time.perf_counter()
s = run(d / "m.jsonl", d / "out.jsonl", **kw)
cpu, wall = time.process_time() - c, time.perf_counter() - t
got = {r["id"]: r["answer"] for r in map(json.loads, open(d / "out.jsonl"))}
same = sum(got[i] == ray_rows[i]["answer"] for i in ids)
print(f"threads {threads}: {s.answered} images, {cpu / s.answered:.2f} CPU s/image, {wall / s.answered:.2f} wall s/image; "
      f"same answer as Ray for {same}/{len(ids)}; the two that differed: {got['2-33.png']!r} {got['2-58.png']!r}")
