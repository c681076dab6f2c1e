"""``pocketvlm bench`` on a tiny quantized model: every figure present and sane (timings are not asserted:
they belong in benchmarks), the JSON form, the bandwidth probe."""
import json
import subprocess
import sys

import torch

from pocketvlm.bench import bytes_per_token, format_result, kv_bytes_per_token, measure_bandwidth, run_bench

import test_families
from serve_fixtures import write_tokenizer


def _tiny(tmp_path):
    test_families.tiny("qwen2", tmp_path)
    write_tokenizer(tmp_path)
    return tmp_path


def test_bench_reports_every_figure(tmp_path):
    r = run_bench(_tiny(tmp_path), prompt_tokens=20, gen_tokens=6, repeat=2, threads=1, quantization="q4f16_1",
                  progress=False)
    assert r.prefill_tok_s["n"] == 2 and r.prefill_tok_s["mean"] > 0 and r.decode_tok_s["mean"] > 0
    assert r.load_s > 0 and r.peak_rss_bytes > 0 and r.decode_path == "fused"
    assert r.bytes_per_token > 0 and r.bandwidth_gb_s > 0
    # 3 layers x (k + v) x 2 kv heads x head dim 16 x 2 bytes (float16 cache of a quantized model) per
    # position, at mean depth 20 + (6 + 1) / 2
    assert r.kv_cache_dtype == "float16" and r.kv_bytes_per_token == int(3 * 2 * 2 * 16 * 2 * 23.5)
    assert r.bytes_per_token == r.weight_bytes_per_token + r.kv_bytes_per_token
    assert abs(r.decode_limit_tok_s - r.bandwidth_gb_s * 1e9 / r.bytes_per_token) < 1e-6 * r.decode_limit_tok_s
    text = format_result(r)
    for word in ("load", "prefill", "decode", "peak RSS", "bandwidth", "float16 KV cache"):
        assert word in text
    f32 = run_bench(tmp_path, prompt_tokens=20, gen_tokens=6, repeat=1, threads=1, quantization="q4f16_1",
                    progress=False, measure_bw=False, kv_cache_dtype="float32")
    assert f32.kv_cache_dtype == "float32" and f32.kv_bytes_per_token == 2 * r.kv_bytes_per_token


def test_bytes_per_token_counts_the_tied_head_once(tmp_path):
    import pocketvlm

    pm = pocketvlm.load(_tiny(tmp_path))
    m = pm.model
    # tied: the embedding (= head) is read in full, once; plus the small buffers (RoPE inverse frequencies)
    n = sum(t.numel() * t.element_size() for t in list(m.parameters()) + list(m.buffers()))
    assert bytes_per_token(m) == n


def test_kv_bytes_of_sliding_window_layers_stop_at_the_window(tmp_path):
    import pocketvlm

    test_families.tiny("mistral-sliding", tmp_path)  # window 4 on every layer
    write_tokenizer(tmp_path)
    pm = pocketvlm.load(tmp_path)
    cache = pm.new_slot().cache
    per_pos = 3 * 2 * 2 * 16 * 4
    assert kv_bytes_per_token(pm.model, cache, 2, 2) == int(per_pos * 3.5)  # mean depth 3.5 < 4
    assert kv_bytes_per_token(pm.model, cache, 100, 8) == per_pos * 4


def test_bandwidth_probe_is_positive():
    torch.set_num_threads(1)
    bw = measure_bandwidth(total_bytes=64 << 20, repeats=2)
    torch.set_num_threads(2)
    assert 1e8 < bw < 1e13  # bytes/s: anything from a slow board to a server


def test_bench_cli_json(tmp_path):
    folder = _tiny(tmp_path)
    out = subprocess.run([sys.executable, "-m", "pocketvlm.cli", "bench", str(folder), "--prompt-tokens", "12",
                          "--gen-tokens", "4", "--repeat", "1", "--threads", "1", "--quantization", "q8f16_1",
                          "--json"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    d = json.loads(out.stdout)
    assert d["quantization"] == "q8f16_1" and d["decode_tok_s"]["n"] == 1 and d["decode_path"] == "fused"
