"""The ``pocketvlm`` command: chat, generate, info (and the commands of the other modules).

Every pocketvlm error becomes one line on stderr and a non-zero exit status.
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

from .errors import AssistantError, ImageError, PocketVLMError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".ppm"}


# --- shared options -----------------------------------------------------------------------------------

KV_CACHE_DTYPE_HELP = ("KV cache dtype: float32, float16, bfloat16 or auto (default: float16 for quantized "
                       "float32 models, else the model dtype)")


def add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps (default: cpu)")
    p.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16 (default: float32)")
    p.add_argument("--quantization", default=None, help="quantize on load, e.g. q4f16_1 (see `pocketvlm convert`)")
    p.add_argument("--context-window-size", type=int, default=None, help="KV cache length (default: min(model, 4096))")
    p.add_argument("--prefill-chunk-size", type=int, default=512,
                   help="prompt tokens per prefill step (default: 512; `serve`: 256, so that a long prompt holds "
                        "the other clients' streams for one short chunk at a time)")
    p.add_argument("--kv-cache-dtype", default="auto", help=KV_CACHE_DTYPE_HELP)
    p.add_argument("--mmproj", default=None,
                   help="llama.cpp mmproj file (vision tower + projector) that makes a .gguf language model a VLM")
    p.add_argument("--verify", action="store_true", help="check the sha256 of every file of a package folder")
    p.add_argument("--compile", action="store_true", help="torch.compile the decode step (eager fallback)")
    p.add_argument("--no-fused", action="store_true",
                   help="decode with the eager PyTorch modules instead of the fused CPU step (q4/q8 models)")
    p.add_argument("--vision-precision", default="auto",
                   help="vision tower: auto (default: int8 on CPUs with AVX-512 VNNI, bf16 on CUDA, else fp32), "
                        "fp32 (exact), bf16 or int8")
    p.add_argument("--template", default=None,
                   help="built-in chat template name (chatml, llama-2, vicuna, gemma, phi-3, zephyr, redpajama_chat); "
                        "default: the checkpoint's own")


def add_sampling_options(p: argparse.ArgumentParser, temperature: float = 0.7) -> None:
    p.add_argument("--max-tokens", type=int, default=512)
    p.add_argument("--temperature", type=float, default=temperature, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")


def sampling_kwargs(a) -> dict:
    return dict(max_tokens=a.max_tokens, temperature=a.temperature, top_p=a.top_p, top_k=a.top_k, min_p=a.min_p,
                repetition_penalty=a.repetition_penalty, seed=a.seed, stop=a.stop)


def load_model(a):
    """The model the flags name: a source (``a.model``), an assistant definition (``.json``), or an assistant of
    ``--vision VLM --chat LLM`` (commands that have those flags)."""
    from .assistant import Assistant, load_any
    from .engine.sampling import SamplingParams

    if hasattr(a, "temperature"):  # validate sampling flags before the (slow) load
        SamplingParams(temperature=a.temperature, top_p=a.top_p, top_k=a.top_k, min_p=a.min_p,
                       repetition_penalty=a.repetition_penalty)
    kw = load_kwargs(a)
    source = kw.pop("source")
    vision, chat = getattr(a, "vision", None), getattr(a, "chat", None)
    if vision or chat:
        if not (vision and chat):
            raise AssistantError("an assistant needs both --vision VLM and --chat LLM")
        if a.model:
            raise AssistantError(f"give either a model ({a.model}) or --vision/--chat, not both")
        if kw.pop("mmproj"):
            raise AssistantError("--mmproj goes with a .gguf model, not with --vision/--chat")
        template = kw.pop("template")  # a --template names the chat model's template
        return Assistant(vision, chat, memory=a.memory or "resident", load_kwargs=kw,
                         chat_load={"template": template} if template else None,
                         **({"describe_prompt": a.describe_prompt} if a.describe_prompt else {}))
    return load_any(source, **kw)


def load_kwargs(a) -> dict:
    """:func:`pocketvlm.load`'s keyword arguments from the model options (plain values: a batch job records
    them as its identity and sends them to each Ray actor)."""
    return dict(source=a.model, device=a.device, dtype=a.dtype, quantization=a.quantization,
                context_window_size=a.context_window_size, prefill_chunk_size=a.prefill_chunk_size,
                template=a.template, verify=getattr(a, "verify", False), compile=getattr(a, "compile", False),
                vision_precision=getattr(a, "vision_precision", "auto"),
                fused=False if getattr(a, "no_fused", False) else None,
                kv_cache_dtype=getattr(a, "kv_cache_dtype", "auto"), mmproj=getattr(a, "mmproj", None))


# --- chat ---------------------------------------------------------------------------------------------

def find_image_paths(text: str) -> tuple[list[str], list[str]]:
    """Words of ``text`` that name image files: (existing paths, missing or unreadable paths)."""
    try:
        words = shlex.split(text)
    except ValueError:
        words = text.split()
    found, bad = [], []
    for w in words:
        w = w.strip(",;:!?()[]{}<>\"'")
        p = Path(w).expanduser()
        if p.suffix.lower() in IMAGE_SUFFIXES or (("/" in w or os.sep in w) and p.is_file()):
            (found if p.is_file() else bad).append(str(p))
    return found, bad


def check_image(path: str) -> str | None:
    """None if ``path`` is a usable image, else a kind message asking the user to check it."""
    from .image import load_image

    try:
        load_image(path)
    except ImageError as e:
        return f"I couldn't use the image {path!r}: {e}. Please check the path and try again."
    return None


def cmd_chat(a) -> int:
    pm = load_model(a)
    out = sys.stdout
    interactive = sys.stdin.isatty()
    is_assistant = pm.architecture == "assistant"
    if getattr(a, "show_description", False) and not is_assistant:
        raise AssistantError("--show-description needs an assistant (--vision VLM --chat LLM or an assistant .json)")
    look_again = False
    if interactive:
        info = pm.info()
        print(f"pocketvlm chat: {info['architecture']} from {info['source']}. "
              f"Commands: /image PATH, {'/look, ' if is_assistant else ''}/reset, /exit.", file=sys.stderr)
    messages: list[dict] = []
    if a.system:
        messages.append({"role": "system", "content": a.system})
    pending_images: list[str] = []
    while True:
        try:
            line = input(">>> " if interactive else "")
        except EOFError:
            break
        line = line.strip()
        if not line:
            continue
        if line in ("/exit", "/quit"):
            break
        if line == "/reset":
            messages = messages[:1] if a.system else []
            pending_images = []
            pm.reset()
            print("(conversation reset)", file=out, flush=True)
            continue
        if line == "/look" and is_assistant:
            look_again = True
            print("(the vision model will look again with your next question)", file=out, flush=True)
            continue
        if line.startswith("/image"):
            path = line[len("/image"):].strip().strip("'\"")
            msg = check_image(path) if path else "Usage: /image PATH"
            if msg:
                print(msg, file=out, flush=True)
            else:
                pending_images.append(path)
                print(f"(image attached: {path})", file=out, flush=True)
            continue
        found, bad = find_image_paths(line)
        problems = [f"I couldn't find the image {b!r}. Please check the path and try again." for b in bad]
        problems += [m for m in (check_image(f) for f in found) if m]
        if problems:
            print("\n".join(problems), file=out, flush=True)
            continue
        images = pending_images + found
        if images and not pm.is_vlm:
            print(f"This model ({pm.architecture}) is text-only and cannot look at images; "
                  "load a vision-language model to ask about them.", file=out, flush=True)
            pending_images = []
            continue
        content = line if not images else (
            [{"type": "image_url", "image_url": {"url": i}} for i in images] + [{"type": "text", "text": line}])
        messages.append({"role": "user", "content": content})
        pending_images = []
        answer = []
        extra = {"look_again": look_again} if is_assistant else {}
        look_again = False
        try:
            pieces = pm.chat_stream(messages, **extra, **sampling_kwargs(a))
            for i, piece in enumerate(pieces):
                if i == 0 and is_assistant:
                    show_assistant_notes(pm, a, out)
                answer.append(piece)
                out.write(piece)
                out.flush()
        except PocketVLMError as e:
            messages.pop()
            print(f"\nerror: {e}", file=out, flush=True)
            continue
        out.write("\n")
        out.flush()
        messages.append({"role": "assistant", "content": "".join(answer)})
    return 0


def show_assistant_notes(pm, a, out) -> None:
    """An assistant's warnings (always) and, with --show-description, what its vision model said."""
    info = pm.last_info() or {}
    for w in info.get("warnings", []):
        print(f"(warning: {w})", file=out, flush=True)
    if getattr(a, "show_description", False):
        for d in info.get("descriptions", []):
            how = "cached" if d["cached"] else f"{d['describe_ms']:.0f} ms"
            print(f"[image {d['image']}, described ({how}): {d['description']}]", file=out, flush=True)


def cmd_generate(a) -> int:
    pm = load_model(a)
    if a.image:
        for img in a.image:
            msg = check_image(img)
            if msg:
                raise ImageError(msg)
        content = [{"type": "image_url", "image_url": {"url": i}} for i in a.image] + [{"type": "text", "text": a.prompt}]
        pieces = pm.chat_stream([{"role": "user", "content": content}], **sampling_kwargs(a))
    elif a.raw:
        pieces = pm.stream(a.prompt, **sampling_kwargs(a))
    else:
        pieces = pm.chat_stream([{"role": "user", "content": a.prompt}], **sampling_kwargs(a))
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def cmd_info(a) -> int:
    pm = load_model(a)
    info = pm.info()
    width = max(map(len, info))
    for k, v in info.items():
        if k == "parameters":
            v = f"{v:,} ({v / 1e6:.1f}M)"
        print(f"{k:<{width}}  {v}")
    return 0


# --- entry point --------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    from .real_models import DEFAULT_MODEL

    ap = argparse.ArgumentParser(prog="pocketvlm", description="Small vision-language models on the machines you carry.")
    sub = ap.add_subparsers(dest="command", required=True)
    model_help = f"HF folder or repo id, .gguf file, package folder, or built-in name (default: {DEFAULT_MODEL})"

    p = sub.add_parser("chat", help="interactive multi-turn chat (images with /image PATH)")
    p.add_argument("model", nargs="?", default=None, help=model_help)
    p.add_argument("--system", default=None, help="system message")
    p.add_argument("--vision", default=None, metavar="VLM",
                   help="an assistant: this vision-language model describes each image ... (with --chat)")
    p.add_argument("--chat", default=None, metavar="LLM", help="... and this chat model answers (with --vision)")
    p.add_argument("--memory", choices=("resident", "sequential"), default=None,
                   help="assistant memory policy: both models loaded (resident, default) or one at a time")
    p.add_argument("--describe-prompt", default=None,
                   help="what the assistant asks its vision model ({question}: the user's message)")
    p.add_argument("--show-description", action="store_true", help="print what the assistant's vision model said")
    add_model_options(p)
    add_sampling_options(p)
    p.set_defaults(fn=cmd_chat)

    p = sub.add_parser("generate", help="one-shot answer to a prompt")
    p.add_argument("model", nargs="?", default=None, help=model_help)
    p.add_argument("-p", "--prompt", required=True)
    p.add_argument("--image", action="append", default=None, help="image path (repeatable)")
    p.add_argument("--raw", action="store_true", help="complete the prompt as-is, without the chat template")
    add_model_options(p)
    add_sampling_options(p)
    p.set_defaults(fn=cmd_generate)

    p = sub.add_parser("info", help="architecture, parameters, dtype, context length, template")
    p.add_argument("model", nargs="?", default=None, help=model_help)
    add_model_options(p)
    p.set_defaults(fn=cmd_info)

    for register in _plugins():
        register(sub)
    return ap


def _plugins():
    """Subcommands that live with their own module (convert, package, fit, bench, serve)."""
    import importlib

    for mod, fn in [("pocketvlm.package.cli", "register_cli"), ("pocketvlm.bench", "register_cli"),
                    ("pocketvlm.serve.app", "register_cli"),
                    ("pocketvlm.eval.cli", "register_cli"), ("pocketvlm.batch.cli", "register_cli"),
                    ("pocketvlm.scenes.cli", "register_cli"), ("pocketvlm.train.cli", "register_cli"),
                    ("pocketvlm.export.cli", "register_cli")]:
        try:
            yield getattr(importlib.import_module(mod), fn)
        except (ImportError, AttributeError):
            continue


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args) or 0
    except PocketVLMError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
