"""Do the frozen DINOv2 features of pocketvlm-scenes (ViT-S/14 at 168 px, layers -7 and -1) hold which bar of a
generated chart is the tallest / shortest (``--task chart``), or which word or number a text scene shows
(``--task word``)? The trained model names that bar at prior level and reads at blind level (README), so this
asks whether the tower or the training is the limit.

    python benchmarks/chart_probe.py [--charts 1600] [--test 300]
    python benchmarks/chart_probe.py --task word [--charts 4000] [--test 500]

The probe is one attention pooling: a learned score per patch (its features plus a learned position bias),
softmax over the 144 patches, then a linear map of the pooled features and the attention map to the bar
index (A-E), or to the word (one class per word or number seen). Scenes from training seed 4 (not the eval seed 1);
trained on the first ones, scored on the rest."""
import argparse
import time

import torch

from pocketvlm.image import preprocess
from pocketvlm.real_models import scenes_vlm_path
from pocketvlm.scenes import make_scene
from pocketvlm.train.loop import load_base


def of_kind(n, kind, seed=4):
    """The first ``n`` scenes of ``kind`` ("chart" or "text") of ``seed``."""
    out, i = [], 0
    while len(out) < n:
        s = make_scene(seed, i)
        i += 1
        if s.kind == kind:
            out.append(s)
    return out


@torch.no_grad()
def features(scenes, batch=32):
    """What the projector of pocketvlm-scenes receives: its own preprocessing and selected tower layers."""
    loaded, _, proc = load_base(scenes_vlm_path())
    feats = []
    for b in range(0, len(scenes), batch):
        pix = torch.cat([preprocess(s.image, proc).pixel_values for s in scenes[b:b + batch]])
        feats.append(loaded.model.image_hidden_states(pix).float())
    f = torch.cat(feats)
    return (f - f.mean((0, 1))) / (f.std((0, 1)) + 1e-5)


def probe(f, y, n_train, steps=400, classes=5):
    torch.manual_seed(0)
    p, d = f.shape[1:]
    pos, score, head = torch.nn.Parameter(torch.zeros(p)), torch.nn.Linear(d, 1), torch.nn.Linear(d + p, classes)
    opt = torch.optim.Adam([pos, *score.parameters(), *head.parameters()], lr=3e-3, weight_decay=1e-4)

    def forward(x):
        a = torch.softmax(score(x).squeeze(-1) + pos, -1)
        return head(torch.cat([torch.einsum("bp,bpd->bd", a, x), a], -1))

    for _ in range(steps):
        idx = torch.randint(0, n_train, (256,))
        loss = torch.nn.functional.cross_entropy(forward(f[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return (forward(f[n_train:]).argmax(-1) == y[n_train:]).float().mean().item()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", choices=("chart", "word"), default="chart")
    ap.add_argument("--charts", type=int, default=None, help="scenes (default 1600 charts, 4000 text scenes)")
    ap.add_argument("--test", type=int, default=None, help="held-out scenes (default 300 charts, 500 text scenes)")
    a = ap.parse_args()
    t0 = time.time()
    n = a.charts or (1600 if a.task == "chart" else 4000)
    n_train = n - (a.test or (300 if a.task == "chart" else 500))
    scenes = of_kind(n, "chart" if a.task == "chart" else "text")
    f = features(scenes)
    if a.task == "word":
        vocab = sorted({s.text.answer for s in scenes})
        y = torch.tensor([vocab.index(s.text.answer) for s in scenes])
        prior = (y[n_train:] == torch.bincount(y[:n_train], minlength=len(vocab)).argmax()).float().mean().item()
        print(f"word: probe {100 * probe(f, y, n_train, steps=1500, classes=len(vocab)):.1f}% of {n - n_train} "
              f"held-out text scenes, {len(vocab)} words and numbers (most frequent {100 * prior:.1f}%)")
        print(f"{n} text scenes, {time.time() - t0:.0f} s")
        return
    for name, pick in (("tallest", max), ("shortest", min)):
        y = torch.tensor([pick(range(len(s.bars)), key=lambda k, s=s: s.bars[k].height) for s in scenes])
        prior = (y[n_train:] == torch.bincount(y[:n_train], minlength=5).argmax()).float().mean().item()
        print(f"{name}: probe {100 * probe(f, y, n_train):.1f}% of {n - n_train} held-out charts "
              f"(most frequent letter {100 * prior:.1f}%)")
    print(f"{n} charts, {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
