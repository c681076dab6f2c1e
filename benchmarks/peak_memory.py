"""Peak memory of each engine doing the same job, each in its own process (peak resident set size from
``wait4``, which covers everything the process mapped and touched, weights included):

    .venv/bin/python benchmarks/peak_memory.py [--threads 2] [--json OUT]

Jobs, as in ``benchmarks/compare.py`` and ``benchmarks/image_question.py``:

- **text**: real Qwen2.5-Coder-0.5B-Instruct, a 512-token prompt and 32 generated tokens (greedy):
  pocketvlm on the GGUF's own blocks (the default of ``scripts/chat.sh``), pocketvlm q4f16_1 from a package
  (made once with ``pocketvlm convert``), transformers bf16 on the GGUF (dequantized), llama.cpp
  ``llama-completion`` on the Q4_K_M file and on the Q4_0 file of the same bits as q4f16_1;
- **image**: pocketvlm-scenes, one image + a short question: pocketvlm as it ships (q4f16_1 package) and
  ``llama-mtmd-cli`` on its GGUF export (Q4_0 LLM, f16 tower).

Timing is not the point here (see compare.py); a row whose engine is missing is reported as skipped.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

HERE = Path(__file__).resolve().parent
PY = sys.executable


def peak_mib(cmd: list[str], env=None, timeout: float = 900) -> tuple[float, str]:
    """(peak RSS in MiB, last output line) of ``cmd`` run to completion as a child of this process."""
    import threading

    if not Path(cmd[0]).exists() and cmd[0] != PY:
        raise FileNotFoundError(f"{cmd[0]} not found (build llama.cpp with benchmarks/build_llamacpp.sh)")
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True,
                         errors="replace")
    timer = threading.Timer(timeout, p.kill)
    timer.start()
    try:
        out = p.stdout.read()
        _, status, ru = os.wait4(p.pid, 0)  # this child's own rusage (Popen.wait would discard it)
    finally:
        timer.cancel()
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode:
        raise RuntimeError(f"{Path(cmd[0]).name} failed ({p.returncode}): {out[-1500:]}")
    lines = [x for x in out.splitlines() if x.strip()]
    return ru.ru_maxrss / 1024, lines[-1] if lines else ""


def run_child(code: str, threads: int) -> tuple[float, str]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    return peak_mib([PY, "-c", textwrap.dedent(code)], env=env)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    sys.path.insert(0, str(HERE))
    from pocketvlm.export.llamacpp import binary
    from pocketvlm.real_models import cache_dir, resolve_source

    t = a.threads
    gguf = Path(resolve_source("qwen2.5-coder-0.5b-instruct"))
    prompt_ids = "torch.randint(100, 30000, (512,), generator=torch.Generator().manual_seed(0)).tolist()"
    rows: dict[str, dict] = {}

    def record(name, fn):
        try:
            mib, last = fn()
            rows[name] = {"peak_mib": round(mib, 1), "last_line": last[-200:]}
        except (RuntimeError, FileNotFoundError, subprocess.TimeoutExpired) as e:
            rows[name] = {"skipped": str(e)[-300:]}
        print(f"{name:45s} {rows[name].get('peak_mib', 'skipped')}", flush=True)

    pkg = cache_dir() / "bench-models" / "qwen-q4f16_1-package"
    if not (pkg / "config.json").exists():
        subprocess.run([PY, "-m", "pocketvlm", "convert", str(gguf), "--quantization", "q4f16_1", "-o", str(pkg),
                        "--overwrite"], check=True)
    for name, src, q in (("pocketvlm, GGUF blocks (Q4_K_M file)", gguf, "gguf"),
                         ("pocketvlm q4f16_1 package", pkg, None)):
        record(name, lambda src=src, q=q: run_child(f"""
            import torch, pocketvlm
            torch.set_num_threads({t})
            m = pocketvlm.load({str(src)!r}, quantization={q!r})
            out = m.generate({prompt_ids}, max_tokens=32, temperature=0)
            print(len(out))
            """, t))
    record("transformers bf16 (from the GGUF)", lambda: run_child(f"""
        import torch
        from transformers import AutoModelForCausalLM
        torch.set_num_threads({t})
        m = AutoModelForCausalLM.from_pretrained({str(gguf.parent)!r}, gguf_file={gguf.name!r}, dtype=torch.bfloat16)
        x = torch.tensor([{prompt_ids}])
        print(m.generate(x, max_new_tokens=32, do_sample=False).shape)
        """, t))
    exe = binary("llama-completion")
    q4_0 = cache_dir() / "llama.cpp" / "qwen-q4_0.gguf"
    for name, f in (("llama.cpp Q4_K_M (llama-completion)", gguf), ("llama.cpp Q4_0, same bits", q4_0)):
        words = " ".join(["hello world"] * 256)  # ~512 tokens of prompt
        record(name, lambda f=f: peak_mib([str(exe or "llama-completion"), "-m", str(f), "-p", words, "-n", "32",
                                           "--temp", "0", "-t", str(t), "-c", "1024", "--no-warmup", "-no-cnv",
                                           "--no-display-prompt"]))
    image = HERE.parent / "docs" / "scene-example.png"
    question = "How many shapes are there?\nAnswer with a single word or number."
    record("pocketvlm-scenes image question (as shipped)", lambda: run_child(f"""
        import torch, pocketvlm
        torch.set_num_threads({t})
        m = pocketvlm.load("pocketvlm-scenes")
        msgs = [{{"role": "user", "content": [{{"type": "image", "image": {str(image)!r}}},
                                              {{"type": "text", "text": {question!r}}}]}}]
        print(m.chat(msgs, max_tokens=8, temperature=0))
        """, t))
    mtmd = binary("llama-mtmd-cli")
    exp = cache_dir() / "bench-models" / "gguf-pocketvlm-scenes-q4_0"
    record("llama-mtmd-cli, pocketvlm-scenes Q4_0 export", lambda: peak_mib(
        [str(mtmd or "llama-mtmd-cli"), "-m", str(exp / "pocketvlm-scenes.gguf"),
         "--mmproj", str(exp / "mmproj-pocketvlm-scenes.gguf"),
         "--image", str(image), "-p", "<__media__>\n" + question, "--temp", "0", "-n", "8", "--jinja", "-t", str(t),
         "--no-warmup"]))
    if a.json:
        Path(a.json).write_text(json.dumps({"threads": t, "rows": rows}, indent=2))
    lines = [f"| job, {t} threads | peak RSS MiB |", "|---|---:|"]
    lines += [f"| {name} | {r['peak_mib'] if 'peak_mib' in r else 'skipped: ' + r['skipped'][-80:]} |"
              for name, r in rows.items()]
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
