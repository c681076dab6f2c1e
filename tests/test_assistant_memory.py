"""Peak memory of the two-model assistant, measured in a fresh process (VmHWM), against `pocketvlm fit`'s
estimate: the sum of both models for ``resident``, the larger one for ``sequential``. The random models are
sized (~300 and ~370 MB of float32 weights) so that the two policies' estimates differ by more than the 15%
the test allows: a sequential assistant that kept its VLM would fail it."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from serve_fixtures import make_tiny_llava, make_tiny_qwen2  # noqa: E402
from test_memory import measured_runtime  # noqa: E402

TOLERANCE = 0.15
MEASURE = r"""
import json, sys
from PIL import Image
import pocketvlm
a = pocketvlm.load(sys.argv[1])
msgs = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": Image.new("RGB", (32, 32), (9, 99, 199))}},
                                     {"type": "text", "text": "What is in this picture?"}]}]
a.chat(msgs, temperature=0, max_tokens=4)
a.chat(msgs + [{"role": "assistant", "content": "ok"}, {"role": "user", "content": "Hello"}], temperature=0, max_tokens=4)
print(json.dumps({"peak_rss": next(int(l.split()[1]) * 1024 for l in open("/proc/self/status")
                                   if l.startswith("VmHWM:")), "looks": a.looks}))
"""


def enlarge_llava(tiny: Path, out: Path, hidden: int, layers: int) -> Path:
    """The tiny LLaVA's CLIP tower with a larger random Qwen2 language model and projector (written without
    transformers, whose model init at this size takes long)."""
    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(tiny, out)
    cfg = json.loads((out / "config.json").read_text())
    t = cfg["text_config"]
    heads, kv, inter, vocab = 8, 2, 2 * hidden, t["vocab_size"]
    t.update(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads,
             num_key_value_heads=kv, layer_types=["full_attention"] * layers)
    (out / "config.json").write_text(json.dumps(cfg, indent=1))
    g = torch.Generator().manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, generator=g) * 0.02

    w = {k: v for k, v in load_file(str(tiny / "model.safetensors")).items() if k.startswith("vision_tower.")}
    vh, hd = cfg["vision_config"]["hidden_size"], hidden // heads
    w.update({"multi_modal_projector.linear_1.weight": rnd(hidden, vh), "multi_modal_projector.linear_1.bias": rnd(hidden),
              "multi_modal_projector.linear_2.weight": rnd(hidden, hidden), "multi_modal_projector.linear_2.bias": rnd(hidden),
              "language_model.model.embed_tokens.weight": rnd(vocab, hidden), "language_model.lm_head.weight": rnd(vocab, hidden),
              "language_model.model.norm.weight": torch.ones(hidden)})
    w["language_model.lm_head.weight"][cfg["image_token_index"]] = 0
    for i in range(layers):
        p = f"language_model.model.layers.{i}."
        for name, shape in [("self_attn.q_proj", (heads * hd, hidden)), ("self_attn.k_proj", (kv * hd, hidden)),
                            ("self_attn.v_proj", (kv * hd, hidden))]:
            w[p + name + ".weight"], w[p + name + ".bias"] = rnd(*shape), rnd(shape[0])
        w.update({p + "self_attn.o_proj.weight": rnd(hidden, heads * hd), p + "mlp.gate_proj.weight": rnd(inter, hidden),
                  p + "mlp.up_proj.weight": rnd(inter, hidden), p + "mlp.down_proj.weight": rnd(hidden, inter),
                  p + "input_layernorm.weight": torch.ones(hidden), p + "post_attention_layernorm.weight": torch.ones(hidden)})
    save_file(w, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    d = tmp_path_factory.mktemp("assistant-memory")
    vlm = enlarge_llava(make_tiny_llava(d / "tiny-llava"), d / "vlm", hidden=1024, layers=7)
    llm = make_tiny_qwen2(d / "llm", hidden=1024, layers=9, std=0.02, max_position_embeddings=512)
    return d, vlm, llm


@pytest.mark.parametrize("memory", ["resident", "sequential"])
def test_peak_rss_within_15_percent_of_the_fit_estimate(pair, memory):
    from pocketvlm.package.memory import estimate_assistant

    d, vlm, llm = pair
    spec = d / f"{memory}.json"
    spec.write_text(json.dumps({"vision": str(vlm), "chat": str(llm), "memory": memory,
                                "vision_load": {"context_window_size": 512}, "chat_load": {"context_window_size": 512},
                                "vision_options": {"max_tokens": 8}}))
    # this machine's runtime (its own test checks the RUNTIME_BYTES constant): the runtime differs by ~60 MiB
    # between the VMs this runs on, and this test is about the policies and the models' terms
    runtime = measured_runtime()
    est = estimate_assistant(spec, runtime_bytes=runtime)
    runs = []
    for _ in range(2):  # the smaller peak of two fresh processes: a measurement the system can disturb
        r = subprocess.run([sys.executable, "-c", MEASURE, str(spec)], capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-2000:]
        runs.append(json.loads(r.stdout.strip().splitlines()[-1]))
        assert runs[-1]["looks"] == 1
    got = min(runs, key=lambda g: g["peak_rss"])
    total, parts = est["bytes"]["total"], est["parts"]
    print(f"\n{memory}: peak {got['peak_rss'] / 2**20:.0f} MiB, estimate {total / 2**20:.0f} MiB "
          f"(runtime {runtime / 2**20:.0f}, vision {parts['vision']['bytes']['total'] / 2**20:.0f}, chat {parts['chat']['bytes']['total'] / 2**20:.0f}), "
          f"{100 * (got['peak_rss'] / total - 1):+.1f}%")
    assert abs(got["peak_rss"] / total - 1) <= TOLERANCE
