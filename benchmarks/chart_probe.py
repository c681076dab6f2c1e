"""Do the frozen DINOv2 features of pocketvlm-scenes (ViT-S/14 at 168 px, layers -7 and -1) hold which bar of a
generated chart is the tallest / shortest? The trained model names that bar at prior level (README), so this
asks whether the tower or the training is the limit.

    python benchmarks/chart_probe.py [--charts 1600] [--test 300]

The probe is one attention pooling: a learned score per patch (its features plus a learned position bias),
softmax over the 144 patches, then a linear map of the pooled features and the attention map to the bar
index (A-E). Charts from training seed 4 (not the eval seed 1); trained on the first ones, scored on the rest."""
import argparse
import time

import torch

from pocketvlm.image import preprocess
from pocketvlm.real_models import scenes_vlm_path
from pocketvlm.scenes import make_scene
from pocketvlm.train.loop import load_base


def charts(n, seed=4):
    out, i = [], 0
    while len(out) < n:
        s = make_scene(seed, i)
        i += 1
        if s.kind == "chart":
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


def probe(f, y, n_train, steps=400):
    torch.manual_seed(0)
    p, d = f.shape[1:]
    pos, score, head = torch.nn.Parameter(torch.zeros(p)), torch.nn.Linear(d, 1), torch.nn.Linear(d + p, 5)
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
    ap.add_argument("--charts", type=int, default=1600)
    ap.add_argument("--test", type=int, default=300)
    a = ap.parse_args()
    t0 = time.time()
    scenes = charts(a.charts)
    f = features(scenes)
    n_train = a.charts - a.test
    for name, pick in (("tallest", max), ("shortest", min)):
        y = torch.tensor([pick(range(len(s.bars)), key=lambda k, s=s: s.bars[k].height) for s in scenes])
        prior = (y[n_train:] == torch.bincount(y[:n_train], minlength=5).argmax()).float().mean().item()
        print(f"{name}: probe {100 * probe(f, y, n_train):.1f}% of {a.test} held-out charts "
              f"(most frequent letter {100 * prior:.1f}%)")
    print(f"{a.charts} charts, {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
