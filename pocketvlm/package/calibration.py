"""``convert --calibrate``: the calibration text (or, for a vision-language model, LLaVA-format conversations
with their images), the memory check before loading, and the calibrated quantization itself
(:func:`pocketvlm.quant.calibrate.calibrate_model`)."""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, replace
from pathlib import Path

from ..errors import PackageError
from ..quant.blocktune import STEPS
from ..quant.e2etune import STEPS as E2E_STEPS, TOPK, WINDOWS as E2E_WINDOWS, one_pass
from ..quant.calibrate import CONTEXT, WINDOWS, check_mode, default_text


@dataclass(frozen=True)
class CalibrationText:
    text: str
    name: str  # the file, or "default" (Python's pydoc_data topics and standard-library docstrings)
    windows: int
    tune_steps: int = STEPS
    e2e_steps: int | None = E2E_STEPS  # None: one pass over the tuning windows
    context: int = CONTEXT

    def record(self) -> dict:
        """What config.json keeps about the calibration (enough to redo it)."""
        return {"method": _method(self.tune_steps, self.e2e_steps), "text": self.name, "tune_steps": self.tune_steps,
                "e2e_steps": self.e2e_steps, "text_sha256": hashlib.sha256(self.text.encode()).hexdigest(),
                "windows": self.windows, "context": self.context}


def _method(tune_steps: int, e2e_steps: int = 0) -> str:
    gptq = "gptq (act-order, static groups, error-minimising scales)"
    return (gptq + (f", then {tune_steps} steps of block-wise tuning per layer" if tune_steps else "")
            + (f", then {e2e_steps} steps of end-to-end scale tuning" if e2e_steps else ""))


#: conversations taken from a LLaVA-format calibration file by default (each is one window)
CONVERSATIONS = 128
CONVERSATION_SUFFIXES = (".json", ".jsonl")


@dataclass(frozen=True)
class CalibrationImages:
    """LLaVA-format conversations with images (``pocketvlm.train.data``): each one is rendered with the
    model's chat template, its image preprocessed, and run as one calibration window."""
    path: Path
    windows: int      # conversations used, at most
    sha256: str
    tune_steps: int = STEPS
    e2e_steps: int | None = E2E_STEPS  # None: one pass over the conversations
    context: int = CONTEXT  # for the memory estimate: a conversation with its image slots, at most about this

    def record(self) -> dict:
        return {"method": _method(self.tune_steps, self.e2e_steps), "data": str(self.path),
                "tune_steps": self.tune_steps, "e2e_steps": self.e2e_steps,
                "data_sha256": self.sha256, "windows": self.windows, "images": True}


def prepare(mode, calibrate, windows: int | None = None, tune_steps: int | None = None,
            e2e_steps: int | None = None) -> CalibrationText | CalibrationImages:
    """Check the mode and read the calibration text, before anything slow happens. ``calibrate`` is
    ``True``/``"default"`` for the default text, a text file's path, or a LLaVA-format ``.json``/``.jsonl``
    file of conversations with images (vision-language models). ``tune_steps``: block-wise tuning steps
    per layer after GPTQ (default :data:`pocketvlm.quant.blocktune.STEPS`; 0: GPTQ alone); ``e2e_steps``: then
    steps of end-to-end scale tuning (default :data:`pocketvlm.quant.e2etune.STEPS`: one pass over the tuning
    windows; 0: none)."""
    check_mode(mode)
    n = None if windows is None else int(windows)
    if n is not None and n < 1:
        raise PackageError(f"--calibration-windows must be at least 1, got {windows}")
    steps = STEPS if tune_steps is None else int(tune_steps)
    if steps < 0:
        raise PackageError(f"--tune-steps must be 0 (GPTQ alone) or more, got {tune_steps}")
    e2e = E2E_STEPS if e2e_steps is None else int(e2e_steps)
    if e2e is not None and e2e < 0:
        raise PackageError(f"--e2e-steps must be 0 (none) or more, got {e2e_steps}")
    return replace(_read(calibrate, n), tune_steps=steps, e2e_steps=e2e)


def _read(calibrate, n: int | None) -> CalibrationText | CalibrationImages:
    if calibrate is True or calibrate == "default":
        return CalibrationText(default_text(), "default", WINDOWS if n is None else n)
    path = Path(calibrate).expanduser()
    if not path.is_file():
        raise PackageError(f"calibration text {path} does not exist (or is not a file)")
    if path.suffix in CONVERSATION_SUFFIXES:
        from ..train.data import read_rows

        rows = read_rows(path)  # not JSON, or not a list: a clear error here, before the model loads
        if not rows:
            raise PackageError(f"calibration data {path} holds no conversation")
        return CalibrationImages(path, CONVERSATIONS if n is None else n, hashlib.sha256(path.read_bytes()).hexdigest())
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise PackageError(f"calibration text {path} is not UTF-8 text ({e.reason} at byte {e.start})") from e
    if not text.strip():
        raise PackageError(f"calibration text {path} is empty")
    if len(text.encode()) < CONTEXT:  # a byte-level tokenizer gives at most one token per byte
        raise PackageError(f"calibration text {path} has {len(text.encode())} bytes, fewer than one window of "
                           f"{CONTEXT} tokens; give a longer text (a few thousand words)")
    return CalibrationText(text, str(path), WINDOWS if n is None else n)


def available_memory() -> int:
    """Bytes the OS says a new allocation can have now (``MemAvailable``), else physical memory."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def calibration_bytes(source, mode, text: CalibrationText | CalibrationImages) -> int:
    """Peak bytes of a calibrated conversion: the float32 model, the quantized copies made as it goes, one
    forward window (its activations and float32 logits), the recorded layer inputs, GPTQ's working set
    (on the largest weight, a slice of rows at a time) and the block-wise tuning's; with end-to-end tuning,
    whichever is larger of that and its working set (every weight dense, with the logits' gradients)."""
    from ..quant import parse_mode
    from .memory import _text_cfg, estimate_memory, meta_model, source_config

    config, tok = source_config(source)
    config.pop("quantization", None)
    fp = estimate_memory(config, "q0f32", text.context, text.context, tokenizer_bytes=tok)
    q = estimate_memory(config, parse_mode(mode).name, text.context, text.context)
    _, _, cfg = meta_model(config, None, text.context)
    t = _text_cfg(cfg)
    hidden, vocab = t.hidden_size, t.vocab_size
    inter = getattr(t, "intermediate_size", 4 * hidden) or 4 * hidden
    logits = 3 * text.context * vocab * 4
    states = 2 * text.windows * text.context * hidden * 4
    # GPTQ on the largest weight (the LM head / tied table): its uint8 codes, and ~12 float32 copies of the
    # slice of rows it rounds at once (padded and permuted weight, column scales, the scale search's
    # temporaries; measured 2026-12-05 on Qwen's 151937 x 896 head: 0.74 GiB above the weight itself, where
    # the whole table at once took 4.36 GiB), plus copies of the Hessian
    from ..quant.gptq import ROWS

    shapes = [(vocab, hidden), (inter, hidden), (hidden, inter)]
    gptq = (max(r * c for r, c in shapes) + 12 * max(min(r, ROWS) * c for r, c in shapes) * 4
            + max(hidden, inter) ** 2 * 4 * 5)
    tune = 0
    if text.tune_steps:  # the float model's stream and its targets; one layer's tunable copies and activations
        from ..quant.blocktune import BATCH

        states *= 2
        tune = 6 * (4 * hidden * hidden + 3 * hidden * inter) * 4 + BATCH * text.context * inter * 4 * 8
    e2e = 0
    if text.e2e_steps != 0:  # every linear as levels, a float32 and a bf16 weight kept for the backward; the logits
        # and their grads; the float model's top-k targets on every tuning window (a text: up to E2E_WINDOWS of it).
        # Measured with `/usr/bin/time -v` on the default text: Qwen2.5-Coder-0.5B q4f16_1 peaked at 8.70 GiB
        # (2026-12-06), Gemma 3 270M (262k vocabulary) at 5.88 GiB (2026-12-07), where 4 logits copies estimated 5.55
        n = text.windows if isinstance(text, CalibrationImages) else E2E_WINDOWS
        e2e = fp["weights"] * 2 + 5 * text.context * vocab * 4 + n * text.context * TOPK * 8
    return fp["total"] + q["weights"] + max(logits + states + gptq + tune, e2e)


def memory_shortfall(source, mode, text: CalibrationText | CalibrationImages) -> str | None:
    """What calibrating ``source`` needs against what this machine has, when it has less; else None."""
    need, have = calibration_bytes(source, mode, text), available_memory()
    if need <= have:
        return None
    gib = 2 ** 30
    return (f"calibrating {source} needs about {need / gib:.1f} GiB (the float32 model, its quantized copy, one "
            f"window of activations and GPTQ's working set); this machine has {have / gib:.1f} GiB available")


def check_memory(source, mode, text: CalibrationText | CalibrationImages) -> None:
    short = memory_shortfall(source, mode, text)
    if short:
        raise PackageError(f"{short}. Convert without --calibrate (error-minimising scales only) or on a machine "
                           "with more memory")


def check_source(source, text, mmproj=None) -> None:
    """Conversations with images calibrate a vision-language model only: refuse a text model before loading
    (a ``.gguf`` language model with an ``mmproj`` file is a vision-language model)."""
    if isinstance(text, CalibrationImages) and mmproj is None:
        from .memory import source_config

        config, _ = source_config(source)
        if "vision_config" not in config:
            raise PackageError(f"{text.path} is conversations with images, for a vision-language model; {source} "
                               "is a text model: calibrate it on a text file (or the default text)")


def image_windows(loaded, data: CalibrationImages) -> list[dict]:
    """Each usable conversation of ``data`` as the model's inputs: token ids with the image slots (the chat
    template's rendering, as training reads it) and the preprocessed image."""
    import torch

    from .. import loading
    from ..image import load_image, preprocess
    from ..train.data import Encoder, load_dataset

    model = loaded.model
    if not hasattr(model, "num_image_tokens") or not hasattr(model, "image_hidden_states"):
        raise PackageError(f"calibration on conversations with images needs a LLaVA-style model with a fixed "
                           f"image size; this one ({loaded.config_dict.get('model_type')}) is not: use a text file")
    tok = loading.load_tokenizer(loaded)
    if not tok.chat_template:
        raise PackageError("calibration on conversations renders them with the model's chat template; it has none")
    enc = Encoder(tok, tok.chat_template, model.image_token_id, model.num_image_tokens())
    ds = load_dataset(data.path, enc, max_samples=data.windows)
    proc = loading.load_image_processor(loaded)
    return [{"input_ids": torch.tensor([s.input_ids]),
             "pixel_values": preprocess(load_image(str(s.image)), proc, dtype=torch.float32).pixel_values}
            for s in ds.samples]


def _resolved(text, windows: int):
    """``text`` with its end-to-end steps as a number (the default: one pass over ``windows``)."""
    return text if text.e2e_steps is not None else replace(text, e2e_steps=one_pass(windows))


def run(loaded, mode, text: CalibrationText | CalibrationImages, *, search: bool = True,
        progress: bool = True) -> tuple[dict[str, str], dict]:
    """Tokenize the text, cut its windows (or read the conversations and their images) and calibrate
    ``loaded.model`` in place. Returns the quantization record and what config.json keeps about it."""
    from .. import loading
    from ..quant.calibrate import calibrate_model, calibration_windows

    if isinstance(text, CalibrationImages):
        inputs = image_windows(loaded, text)
        text = _resolved(text, len(inputs))
        report = {}
        record = calibrate_model(loaded.model, mode, inputs, search=search, tune_steps=text.tune_steps,
                                 e2e_steps=text.e2e_steps, progress=progress, report=report)
        return record, {**text.record(), "windows": len(inputs), **report}
    tok = loading.load_tokenizer(loaded)
    bos = tok.bos_token_id if getattr(tok, "add_bos_token", False) else None
    ids = tok.encode(text.text)
    windows = calibration_windows(ids, text.context, text.windows, bos)
    if windows.shape[0] < text.windows:
        import warnings

        warnings.warn(f"the calibration text gives {windows.shape[0]} windows of {text.context} tokens, "
                      f"fewer than the {text.windows} asked for; calibrating on those", stacklevel=2)
    tuning = calibration_windows(ids, text.context, E2E_WINDOWS, bos) if text.e2e_steps != 0 else None
    text = _resolved(text, 0 if tuning is None else tuning.shape[0])
    report = {}
    record = calibrate_model(loaded.model, mode, windows, search=search, tune_steps=text.tune_steps,
                             e2e_steps=text.e2e_steps, e2e_windows=tuning, progress=progress, report=report)
    return record, {**text.record(), "windows": int(windows.shape[0]),
                    **({"e2e_windows": int(tuning.shape[0])} if text.e2e_steps else {}), **report}
