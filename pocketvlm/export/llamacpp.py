"""Run llama.cpp's own tools on GGUF files (the exported ones, or any): where the binaries are, one greedy
image answer from ``llama-mtmd-cli`` (used by the interop tests and ``benchmarks/gguf_interop.py``), and one
greedy text completion from ``llama-completion`` with the prompt's token ids as llama.cpp tokenized them."""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from ..errors import PocketVLMError


def binary(name: str) -> Path | None:
    """llama.cpp tool ``name``: in ``$POCKETVLM_LLAMA_CPP_BIN``, the build ``benchmarks/build_llamacpp.sh`` makes in
    the cache, or on PATH; None when absent."""
    from ..real_models import cache_dir

    for folder in (os.environ.get("POCKETVLM_LLAMA_CPP_BIN"), cache_dir() / "llama.cpp" / "build" / "bin"):
        if folder and (Path(folder) / name).is_file():
            return Path(folder) / name
    found = shutil.which(name)
    return Path(found) if found else None


def mtmd_answer(model: Path, mmproj: Path, image: Path, prompt: str, *, n_predict: int = 16, threads: int = 2,
                exe: Path | None = None) -> tuple[str, dict]:
    """``llama-mtmd-cli``'s greedy answer to ``prompt`` about ``image`` (the model's own chat template, rendered
    with jinja; the image goes where ``<__media__>`` is, else first), and its own timings in ms: ``encode_ms``
    (the vision tower and projector), ``prompt_ms`` (llama_perf's prompt eval: text and image embeddings
    through the LLM), ``load_ms``, and ``wall_ms`` of the whole process."""
    exe = exe or binary("llama-mtmd-cli")
    if exe is None:
        raise PocketVLMError("llama-mtmd-cli not found: build it with `bash benchmarks/build_llamacpp.sh` or set "
                             "POCKETVLM_LLAMA_CPP_BIN")
    cmd = [str(exe), "-m", str(model), "--mmproj", str(mmproj), "--image", str(image), "-p", prompt,
           "--temp", "0", "-n", str(n_predict), "--jinja", "-t", str(threads), "--no-warmup", "-v"]
    return _run(cmd)


def completion(model: Path, prompt: str, *, n_predict: int = 16, threads: int = 2, ctx: int = 512,
               exe: Path | None = None) -> tuple[str, list[int]]:
    """``llama-completion``'s greedy continuation of ``prompt`` (raw text, no chat template; BOS as the file's
    ``add_bos_token`` says, special tokens in the prompt parsed), and the prompt's token ids as llama.cpp's
    tokenizer made them (its ``--verbose-prompt`` listing). The text is the printed token pieces (control tokens
    are not printed), decoded with ``surrogateescape``: ``.encode("utf-8", "surrogateescape")`` gives the
    exact bytes, split characters of byte-fallback tokens included."""
    exe = exe or binary("llama-completion")
    if exe is None:
        raise PocketVLMError("llama-completion not found: build it with `bash benchmarks/build_llamacpp.sh` or "
                             "set POCKETVLM_LLAMA_CPP_BIN")
    cmd = [str(exe), "-m", str(model), "-p", prompt, "-n", str(n_predict), "--temp", "0", "-t", str(threads),
           "-c", str(ctx), "--no-warmup", "-no-cnv", "--no-display-prompt", "--verbose-prompt"]
    for _ in range(3):
        # llama.cpp's asynchronous logger is not flushed at exit (llama.cpp #22142) and can lose the tail of
        # what it printed: a run whose log lacks part of the prompt listing, or (when the answer is wanted, more
        # than one token) the last timing line, is rerun; a one-token run is for the prompt's ids only
        text, log = _run(cmd, keep_log=True)
        ids, counting = [], None
        for line in log.splitlines():
            if "number of tokens in prompt =" in line:
                counting = int(line.rsplit("=", 1)[1])
            elif counting is not None and len(ids) < counting and " -> '" in line:
                ids.append(int(line.split(" -> '", 1)[0].split()[-1]))
        if counting == len(ids) and ("total time =" in log or n_predict <= 1):
            break
    else:
        raise PocketVLMError(f"llama-completion's output came back incomplete three times: {log.strip()[-400:]}")
    # llama-completion ends its output with " [end of text]\n" at an end-of-generation token, then "\n\n"
    text = text.removesuffix("\n\n").removesuffix(" [end of text]\n")
    return text, ids


def _run(cmd: list[str], keep_log: bool = False) -> tuple[str, dict | str]:
    """The tool's stdout and its timings (``keep_log``: stdout exactly as printed, its bytes kept through
    ``surrogateescape``, and the log)."""
    t = time.perf_counter()
    # stdin must not be a terminal or a pipe left open: llama-mtmd-cli then waits or exits without answering.
    # It prints through an asynchronous logger never flushed at exit (llama.cpp #22142), which can lose the
    # answer's tail: benchmarks/build_llamacpp.sh adds the flush.
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        rc = subprocess.run(cmd, stdout=out, stderr=err, stdin=subprocess.DEVNULL).returncode
        out.seek(0)
        err.seek(0)
        # token pieces are raw bytes (a character may span tokens): decoded as a whole, as a tokenizer does
        answer = out.read().decode("utf-8", "surrogateescape" if keep_log else "replace")
        log = err.read().decode("utf-8", "replace")
    wall = (time.perf_counter() - t) * 1000
    if rc != 0:
        raise PocketVLMError(f"{Path(cmd[0]).name} failed ({rc}): {log.strip()[-800:]}")
    if keep_log:
        return answer, log
    timings = {"wall_ms": wall}
    for line in log.splitlines():
        if "batch encoding done in" in line:
            timings["encode_ms"] = timings.get("encode_ms", 0.0) + float(line.split("done in")[1].split("ms")[0])
        for key, label in (("prompt_ms", "prompt eval time ="), ("load_ms", "load time =")):
            if label in line:
                timings[key] = float(line.split(label)[1].split("ms")[0])
    return answer.strip(), timings
