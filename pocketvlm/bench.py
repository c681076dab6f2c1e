"""``pocketvlm bench``: load time, image-encode time, prefill and decode tokens/s, peak RSS, and how close
decode comes to the memory-bandwidth limit of this machine, measured by the command itself.

Decode on a CPU is bound by memory bandwidth: every generated token reads every weight of the language
model once (the embedding table only for one row, unless it is also the LM head), and attention reads the
KV cache of every position so far (counted at the benchmark's mean decode depth). The limit is
``bandwidth / bytes_read_per_token``; bandwidth is measured here as a streaming read of a buffer far larger
than the caches, on the same threads (see :func:`measure_bandwidth`).
"""
from __future__ import annotations

import json
import resource
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm


def peak_rss_bytes() -> int:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb * (1 if sys.platform == "darwin" else 1024)


def best_time(fn, repeats: int) -> float:
    """Seconds of the fastest of ``repeats`` calls after one warm-up call: on a shared machine the minimum is
    the uninterrupted run."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def measure_bandwidth(total_bytes: int = 400 << 20, repeats: int = 5) -> float:
    """Bytes/s of this machine's memory read bandwidth on torch's threads: a max-reduction over a uint8 buffer
    far larger than the caches (PyTorch's vectorized reduction streams at the rate of a hand-written AVX2 read
    loop: 31.8 / 35.1 / 34.7 vs 31.3 / 34.3 / 37.0 GB/s in three runs on 2 threads). Best of ``repeats``."""
    buf = torch.ones(total_bytes, dtype=torch.uint8)  # written once: the pages are really there
    return buf.numel() / best_time(lambda: buf.amax(), repeats)


def _tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def bytes_per_token(model: nn.Module) -> int:
    """Bytes of weights read to decode one token: every tensor of the language model once, except an
    embedding table that is not also the LM head (only one of its rows is read)."""
    lm = getattr(model, "language_model", model)
    emb = lm.get_input_embeddings()
    head = getattr(lm, "lm_head", None)
    tied = head is not None and (getattr(head, "weight", None) is getattr(emb, "weight", object())
                                 or getattr(head, "table", None) is emb)
    skip = set() if tied else {id(t) for t in list(emb.parameters()) + list(emb.buffers())}
    seen, total = set(), 0
    for t in list(lm.parameters()) + [b for b in lm.buffers() if b is not None]:
        if id(t) in seen or id(t) in skip or t.device.type == "meta":
            continue
        seen.add(id(t))
        total += _tensor_bytes(t)
    if not tied:
        w = getattr(emb, "weight", None)
        if w is not None:
            total += _tensor_bytes(w) // max(1, w.shape[0])
    return total


def kv_bytes_per_token(model: nn.Module, cache, prompt_tokens: int, gen_tokens: int) -> int:
    """Bytes of KV cache read by an average decode step of the benchmark: generated token j (0-based)
    attends over prompt_tokens + j + 1 positions, a sliding-window layer over at most its window. Decode
    after a long prompt reads these on top of the weights (13 MB per token for Qwen2.5-0.5B at 544)."""
    from .engine.fused import text_decoder

    text = text_decoder(getattr(model, "language_model", model))
    cfg = getattr(text, "config", None)
    layers = list(getattr(getattr(text, "model", None), "layers", None) or [])
    depth = prompt_tokens + (gen_tokens + 1) / 2  # the mean attended length over the decode steps
    total = 0.0
    for i, (k, v) in enumerate(zip(getattr(cache, "k", []), getattr(cache, "v", []))):
        per_pos = (k[0, :, 0].numel() * k.element_size() + v[0, :, 0].numel() * v.element_size())
        window = None
        if i < len(layers) and getattr(layers[i], "layer_type", None) == "sliding_attention":
            window = getattr(cfg, "sliding_window", None)
        total += per_pos * (min(depth, window) if window else depth)
    return int(total)


def spread(xs: list[float]) -> dict:
    return {"mean": statistics.fmean(xs), "stdev": statistics.stdev(xs) if len(xs) > 1 else 0.0,
            "min": min(xs), "max": max(xs), "n": len(xs)}


@dataclass
class BenchResult:
    model: str
    threads: int
    device: str
    dtype: str
    quantization: str | None
    load_s: float
    prompt_tokens: int
    gen_tokens: int
    prefill_tok_s: dict = field(default_factory=dict)
    decode_tok_s: dict = field(default_factory=dict)
    warmup_s: float = 0.0
    image_encode_ms: dict | None = None
    image_tiles: int | None = None
    peak_rss_bytes: int = 0
    bytes_per_token: int = 0  # weights + kv_bytes_per_token
    weight_bytes_per_token: int = 0
    kv_bytes_per_token: int = 0
    bandwidth_gb_s: float = 0.0
    decode_limit_tok_s: float = 0.0
    bandwidth_share: float = 0.0
    decode_path: str = ""
    kv_cache_dtype: str = ""
    vision_precision: str = ""


def run_bench(source, *, prompt_tokens: int = 512, gen_tokens: int = 128, repeat: int = 3, threads: int | None = None,
              image: str | None = None, device: str = "cpu", dtype: str = "float32", quantization: str | None = None,
              compile: bool = False, fused: bool | None = None, measure_bw: bool = True,
              progress: bool = True, kv_cache_dtype: str | None = None, vision_precision: str = "auto",
              mmproj: str | None = None) -> BenchResult:
    from .api import load
    from .engine.sampling import SamplingParams

    if threads:
        torch.set_num_threads(threads)
    threads = torch.get_num_threads()
    t0 = time.perf_counter()
    pm = load(source, device=device, dtype=dtype, quantization=quantization,
              context_window_size=prompt_tokens + gen_tokens + 8, prefill_chunk_size=max(prompt_tokens, 1),
              compile=compile, fused=fused, kv_cache_dtype=kv_cache_dtype, vision_precision=vision_precision,
              mmproj=mmproj)
    load_s = time.perf_counter() - t0
    vocab = pm.text_config.vocab_size
    g = torch.Generator().manual_seed(0)
    # ordinary-text token ids (avoid the special tokens at the end of the vocabulary)
    ids = torch.randint(100, min(vocab, 30000), (prompt_tokens,), generator=g).tolist()
    greedy = SamplingParams(temperature=0)
    res = BenchResult(str(source), threads, device, str(pm.dtype).replace("torch.", ""), quantization, load_s,
                      prompt_tokens, gen_tokens)
    res.decode_path = pm.info()["decode"]
    res.kv_cache_dtype = pm.info()["kv_cache_dtype"]
    res.vision_precision = pm.info()["vision_precision"]

    t0 = time.perf_counter()  # warm-up (compilation, lazy kernel packing) measured on its own
    slot = pm.new_slot()
    for _ in slot.generate(ids[:16], ids[:16], greedy, 4):
        pass
    res.warmup_s = time.perf_counter() - t0

    pre, dec = [], []
    bar = tqdm(range(repeat), desc="bench", disable=not progress)
    for r in bar:
        slot.reset()
        key = [("bench", r)] + ids[1:]  # a different first key forces a full prefill every repeat
        t = time.perf_counter()
        logits = slot.prefill(key, ids)
        pre.append(prompt_tokens / (time.perf_counter() - t))
        tok = int(logits.argmax())
        t = time.perf_counter()
        for _ in range(gen_tokens):
            tok = int(slot.decode(tok).argmax())
        dec.append(gen_tokens / (time.perf_counter() - t))
        bar.set_postfix(prefill=f"{pre[-1]:.1f}", decode=f"{dec[-1]:.1f}")
    res.prefill_tok_s, res.decode_tok_s = spread(pre), spread(dec)

    if pm.is_vlm:
        from .image import load_image, preprocess

        img = load_image(image) if image else _synthetic_image()
        p = preprocess(img, pm.image_processor, dtype=pm.dtype, device=pm.device)
        times = []
        with torch.inference_mode():
            pm.model.encode_images(p.pixel_values, image_sizes=[p.image_size])  # warm-up
            for _ in range(repeat):
                t = time.perf_counter()
                pm.model.encode_images(p.pixel_values, image_sizes=[p.image_size])
                times.append((time.perf_counter() - t) * 1000)
        res.image_encode_ms, res.image_tiles = spread(times), int(p.pixel_values.shape[0])

    res.peak_rss_bytes = peak_rss_bytes()
    res.weight_bytes_per_token = bytes_per_token(pm.model)
    res.kv_bytes_per_token = kv_bytes_per_token(pm.model, slot.cache, prompt_tokens, gen_tokens)
    res.bytes_per_token = res.weight_bytes_per_token + res.kv_bytes_per_token
    if measure_bw:
        bw = measure_bandwidth()
        res.bandwidth_gb_s = bw / 1e9
        res.decode_limit_tok_s = bw / res.bytes_per_token
        res.bandwidth_share = res.decode_tok_s["mean"] / res.decode_limit_tok_s
    return res


def _synthetic_image():
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (480, 640, 3), dtype=np.uint8))


def format_result(r: BenchResult) -> str:
    def ms(d):
        return f"{d['mean']:.2f} ± {d['stdev']:.2f}"

    lines = [
        f"model            {r.model}",
        f"device / dtype   {r.device} / {r.dtype}   threads {r.threads}   quantization {r.quantization or '-'}",
        f"load             {r.load_s:.2f} s   (warm-up {r.warmup_s:.2f} s)",
        f"prefill          {ms(r.prefill_tok_s)} tokens/s   ({r.prompt_tokens} tokens, {r.prefill_tok_s['n']} runs)",
        f"decode           {ms(r.decode_tok_s)} tokens/s   ({r.gen_tokens} tokens; {r.decode_path}; "
        f"{r.kv_cache_dtype} KV cache)",
    ]
    if r.image_encode_ms:
        per_tile = r.image_encode_ms["mean"] / r.image_tiles
        lines.append(f"image encode     {ms(r.image_encode_ms)} ms per image, {per_tile:.1f} ms per tile "
                     f"({r.image_tiles} tiles; vision tower {r.vision_precision})")
    lines.append(f"peak RSS         {r.peak_rss_bytes / 2**20:.0f} MiB")
    if r.bandwidth_gb_s:
        lines.append(f"bandwidth        {r.bandwidth_gb_s:.1f} GB/s measured; {r.bytes_per_token / 1e6:.1f} MB read "
                     f"per token (weights {r.weight_bytes_per_token / 1e6:.1f}, KV cache {r.kv_bytes_per_token / 1e6:.1f}) "
                     f"-> limit {r.decode_limit_tok_s:.1f} tokens/s; decode at {100 * r.bandwidth_share:.0f}% of it")
    return "\n".join(lines)


def cmd_bench(a) -> int:
    r = run_bench(a.model, prompt_tokens=a.prompt_tokens, gen_tokens=a.gen_tokens, repeat=a.repeat, threads=a.threads,
                  image=a.image, device=a.device, dtype=a.dtype, quantization=a.quantization, compile=a.compile,
                  fused=False if a.no_fused else None, kv_cache_dtype=a.kv_cache_dtype, progress=not a.json,
                  vision_precision=a.vision_precision, mmproj=a.mmproj)
    print(json.dumps(asdict(r), indent=2) if a.json else format_result(r))
    return 0


def register_cli(sub) -> None:
    from .cli import KV_CACHE_DTYPE_HELP

    p = sub.add_parser("bench", help="load time, image encode, prefill and decode speed, memory, bandwidth share")
    p.add_argument("model", nargs="?", default=None)
    p.add_argument("--image", default=None, help="image to encode (VLMs; default: a synthetic 640x480 photo)")
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--gen-tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--quantization", default=None)
    p.add_argument("--kv-cache-dtype", default="auto", help=KV_CACHE_DTYPE_HELP)
    p.add_argument("--vision-precision", default="auto", help="vision tower: auto, fp32, bf16 or int8")
    p.add_argument("--mmproj", default=None, help="llama.cpp mmproj file (vision tower + projector) for a .gguf model")
    p.add_argument("--compile", action="store_true", help="torch.compile the decode step")
    p.add_argument("--no-fused", action="store_true", help="decode with the eager PyTorch modules, not the fused step")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_bench)
