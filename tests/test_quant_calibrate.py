"""Error-minimising scales, GPTQ rounding and calibrated quantization of a whole model."""
import pytest
import torch

from pocketvlm.errors import QuantizationError
from pocketvlm.quant import e2etune, formats, quantize_model
from pocketvlm.quant.calibrate import calibrate_model, calibration_windows, check_mode, default_text
from pocketvlm.quant.gptq import gptq_quantize
from pocketvlm.quant.scales import magnitude_weights, search_scales

MODES = ["q4f16_1", "q4f32_1", "q3f16_1", "q8f16_1"]


def _groups(kind: str, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(64, 8, 40, generator=g)
    if kind == "outliers":  # a few huge weights per row, as in LLM projections
        idx = torch.randint(0, 40, (64, 8, 2), generator=g)
        w.scatter_(-1, idx, 25 * torch.randn(64, 8, 2, generator=g))
    elif kind == "heavy":
        w = torch.distributions.StudentT(2.0).sample((64, 8, 40))
    elif kind == "tiny":
        w = w * 1e-4
    w[0, 0] = 0  # an all-zero group
    return w


def _err(wg, s, mode, h):
    s = s.float().unsqueeze(-1)
    safe = torch.where(s > 0, s, torch.ones_like(s))
    q = torch.where(s > 0, torch.round(wg / safe).clamp(-mode.offset, mode.max_code - mode.offset), 0.0)
    return (h * (wg - q * s) ** 2).sum(-1)


@pytest.mark.parametrize("name", MODES)
@pytest.mark.parametrize("kind", ["gauss", "outliers", "heavy", "tiny"])
@pytest.mark.parametrize("weighting", ["uniform", "magnitude", "columns"])
def test_search_never_worse_than_rtn_per_group(name, kind, weighting):
    mode = formats.parse_mode(name)
    for seed in range(3):
        wg = _groups(kind, seed)[..., :mode.group_size]
        h = {"uniform": torch.ones_like(wg), "magnitude": magnitude_weights(wg),
             "columns": torch.rand(mode.group_size, generator=torch.Generator().manual_seed(seed)) + 0.01}[weighting]
        rtn = (wg.abs().amax(-1) / mode.offset).to(mode.torch_scale_dtype)
        s = search_scales(wg, mode.offset, mode.max_code, mode.torch_scale_dtype, h)
        assert s.dtype == mode.torch_scale_dtype and s.shape == rtn.shape
        e_rtn, e = _err(wg, rtn, mode, h), _err(wg, s, mode, h)
        assert (e <= e_rtn).all()
        if kind != "tiny" or mode.scale_dtype == "float32":
            assert e.sum() < e_rtn.sum()  # and it does find better scales


def test_quantize_with_search_keeps_the_format():
    w = torch.randn(48, 100) * torch.linspace(0.1, 3, 100)
    for name in MODES:
        c0, s0 = formats.quantize(w, name)
        c1, s1 = formats.quantize(w, name, search=True)
        assert c1.shape == c0.shape and s1.shape == s0.shape and c1.dtype == c0.dtype and s1.dtype == s0.dtype
        mode = formats.parse_mode(name)
        assert int(c1.max()) <= mode.max_code
        # codes are RTN codes for the chosen scales, so dequantize reads them as always
        s = s1.float().repeat_interleave(mode.group_size, 1)
        wp = torch.nn.functional.pad(w, (0, c1.shape[1] - 100))
        safe = torch.where(s > 0, s, torch.ones_like(s))
        expect = torch.where(s > 0, torch.round(wp / safe).clamp(-mode.offset, mode.max_code - mode.offset), 0)
        assert torch.equal(c1.long() - mode.offset, expect.long())


# ----- GPTQ -----------------------------------------------------------------------------------------

def _reference_gptq(w, H, mode, damp=0.01):
    """Textbook OBS/GPTQ: quantize column j, spread its error over the later columns with the current
    inverse Hessian, then remove j from that inverse (float64, no Cholesky, no blocks). RTN group scales,
    taken when a group's first column is reached, from the weights updated so far."""
    W = w.double().clone()
    H = H.double().clone()
    H += damp * H.diagonal().mean() * torch.eye(H.shape[0], dtype=torch.float64)
    Hinv = torch.linalg.inv(H)
    g = mode.group_size
    codes = torch.empty(w.shape, dtype=torch.long)
    scales = torch.empty(w.shape[0], w.shape[1] // g, dtype=mode.torch_scale_dtype)
    for j in range(w.shape[1]):
        if j % g == 0:
            scales[:, j // g] = (W[:, j:j + g].abs().amax(-1) / mode.offset).to(mode.torch_scale_dtype)
            s = scales[:, j // g].double()
        q = torch.round(W[:, j] / s).clamp(-mode.offset, mode.max_code - mode.offset)
        codes[:, j] = q.long() + mode.offset
        err = (W[:, j] - q * s) / Hinv[j, j]
        W[:, j + 1:] -= err.unsqueeze(1) * Hinv[j, j + 1:].unsqueeze(0)
        Hinv = Hinv - Hinv[:, j:j + 1] @ Hinv[j:j + 1, :] / Hinv[j, j]
    return codes, scales


def _layer(seed, out_f=24, in_f=64, tokens=400):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(in_f, in_f, generator=g) / in_f ** 0.5 + torch.eye(in_f)  # correlated inputs
    X = torch.randn(tokens, in_f, generator=g) @ mix * torch.linspace(0.2, 2.0, in_f)
    return torch.randn(out_f, in_f, generator=g), X


@pytest.mark.parametrize("name", ["q4f16_1", "q8f16_1"])
def test_gptq_matches_the_textbook_algorithm(name):
    mode = formats.parse_mode(name)
    w, X = _layer(0)
    H = X.t() @ X
    codes, scales = gptq_quantize(w, H, mode, search=False, act_order=False, block=32)
    ref_codes, ref_scales = _reference_gptq(w, H, mode)
    assert torch.equal(scales, ref_scales)
    assert (codes.long() == ref_codes).float().mean() > 0.995  # float32 vs float64 ties, nothing more
    assert (codes.long() - ref_codes).abs().max() <= 1


@pytest.mark.parametrize("name", MODES)
def test_gptq_lowers_the_output_error(name):
    mode = formats.parse_mode(name)
    w, X = _layer(1, in_f=80)  # 80: not a multiple of 32, so padding is exercised
    H = X.t() @ X
    def out_err(codes, scales):
        return ((X @ (w - formats.dequantize(codes, scales, mode, 80)).t()) ** 2).sum()
    rtn = out_err(*formats.quantize(w, mode))
    assert out_err(*gptq_quantize(w, H, mode, search=False)) < 0.9 * rtn
    assert out_err(*gptq_quantize(w, H, mode, search=True)) < 0.9 * rtn


def test_gptq_runs_in_float32_inside_a_bf16_forward():
    """Calibration runs its forwards under bf16 autocast; GPTQ's own updates (``E @ U``) must stay float32
    (they ran in bf16 before 2026-12-05)."""
    w, X = _layer(5, out_f=64, in_f=256)
    H = X.t() @ X
    ref = gptq_quantize(w, H, "q4f16_1")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = gptq_quantize(w, H, "q4f16_1")
    assert all(torch.equal(a, b) for a, b in zip(ref, got))


@pytest.mark.parametrize("act_order", [True, False])
def test_gptq_in_row_slices_equals_all_rows_at_once(act_order, monkeypatch):
    """A tall weight (an LM head) is rounded a slice of rows at a time to bound GPTQ's memory: the codes and
    scales are exactly those of one pass over all rows (rows are independent given the Hessian)."""
    from pocketvlm.quant import gptq

    w, X = _layer(6, out_f=100, in_f=80)
    H = X.t() @ X
    whole = gptq_quantize(w, H, "q4f16_1", act_order=act_order)
    monkeypatch.setattr(gptq, "ROWS", 7)  # 15 slices, the last one short
    sliced = gptq_quantize(w, H, "q4f16_1", act_order=act_order)
    assert all(torch.equal(a, b) for a, b in zip(whole, sliced))


@pytest.mark.parametrize("how", ["search", "gptq"])
def test_8bit_codes_fit_int8(how):
    """8-bit codes are held as signed int8 (code - 127): a searched (smaller) scale or GPTQ's compensation must not
    push a code to 255 (+128), which wrapped to -128 and made a calibrated q8f16_1 model 1,500x further off."""
    from pocketvlm.quant.linear import quant_linear_from_codes

    g = torch.Generator().manual_seed(3)
    w = torch.randn(16, 256, generator=g)
    w[:, ::32] = 6.0  # each group's largest weight positive: the search clips it, GPTQ pushes error onto it
    if how == "search":
        codes, scales = formats.quantize(w, "q8f16_1", search=True)
    else:
        x = torch.randn(512, 256, generator=g)
        codes, scales = gptq_quantize(w, x.t() @ x, "q8f16_1")
    assert int(codes.max()) <= 254 and int(codes.min()) >= 0
    lin = quant_linear_from_codes(torch.nn.Linear(256, 16, bias=False), "q8f16_1", codes, scales)
    torch.testing.assert_close(lin.dequantize(), formats.dequantize(codes, scales, "q8f16_1", 256))
    assert (lin.dequantize() - w).abs().max() < 0.1


def test_gptq_handles_dead_inputs_and_bad_shapes():
    w, X = _layer(2)
    X[:, 5] = 0  # an input that is always zero in the calibration data
    codes, scales = gptq_quantize(w, X.t() @ X, "q4f16_1")
    assert codes.shape == (24, 64) and torch.isfinite(scales.float()).all()
    with pytest.raises(QuantizationError, match="do not match"):
        gptq_quantize(w, torch.eye(63), "q4f16_1")
    with pytest.raises(QuantizationError, match="quantized mode"):
        gptq_quantize(w, torch.eye(64), "q0f16")


# ----- whole model ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from serve_fixtures import make_tiny_qwen2

    import pocketvlm

    d = make_tiny_qwen2(tmp_path_factory.mktemp("calib") / "qwen", hidden=64, layers=2, std=0.1)
    return pocketvlm.load(str(d), quantization="q0f32")


def _kl(ref, model, ids):
    with torch.no_grad():
        p = torch.log_softmax(ref(ids), -1)
        q = torch.log_softmax(model(ids), -1)
    return float((p.exp() * (p - q)).sum(-1).mean())


@pytest.mark.parametrize("mode", ["q4f16_1", "q8f16_1"])
def test_calibrated_model_is_the_same_format_and_closer(tiny_lm, mode):
    import copy

    ids = torch.tensor([tiny_lm.tokenizer.encode(default_text()[:20000])])
    calib, held = ids[:, :2048], ids[:, 2048:2048 + 256]
    windows = calibration_windows(calib[0], context=128, windows=16)
    rtn, cal = copy.deepcopy(tiny_lm.model), copy.deepcopy(tiny_lm.model)
    rec_rtn = quantize_model(rtn, mode, embeddings=True)
    rec_cal = calibrate_model(cal, mode, windows, progress=False)
    assert rec_cal == rec_rtn  # same modules, same modes, tied head included
    assert {k: (v.shape, v.dtype) for k, v in cal.state_dict().items()} == \
           {k: (v.shape, v.dtype) for k, v in rtn.state_dict().items()}
    assert cal.lm_head._embedding is cal.model.embed_tokens  # still one table
    assert _kl(tiny_lm.model, cal, held) < 0.8 * _kl(tiny_lm.model, rtn, held)


def test_default_text_holds_none_of_the_scored_texts():
    """The default text: the language reference first (GPTQ's windows), then other modules' docstrings (the
    end-to-end tuning's); never the topics or the modules' docstrings that benchmarks/perplexity.py scores."""
    from pydoc_data.topics import topics

    from pocketvlm.quant.calibrate import DOCSTRING_MODULES, HELD_OUT_MODULES, HELD_OUT_TOPICS, module_docstrings

    text = default_text()
    first = min(k for k in topics if k not in HELD_OUT_TOPICS)
    assert text.startswith(topics[first]) and not set(HELD_OUT_MODULES) & set(DOCSTRING_MODULES)
    assert not any(topics[k] in text for k in HELD_OUT_TOPICS)
    scored = [d for d in module_docstrings(HELD_OUT_MODULES) if len(d) > 200]
    assert len(scored) > 100 and not any(d in text for d in scored)
    assert module_docstrings(DOCSTRING_MODULES)[-1] in text


def test_calibration_bad_input():
    with pytest.raises(QuantizationError, match="fewer than one window of 512"):
        calibration_windows(list(range(300)), 512)
    with pytest.raises(QuantizationError, match="fewer than one window"):
        calibration_windows([], 512)
    for mode in ("q0f16", "q0f32", "q0bf16"):
        with pytest.raises(QuantizationError, match="nothing to calibrate"):
            check_mode(mode)
    assert check_mode("q4f16_1").bits == 4
    from pydoc_data.topics import topics

    text = default_text()
    assert len(text) > 100_000
    assert all(topics[k][:300] not in text for k in ("execmodel", "naming", "types", "specialnames", "typesseq"))


# ----- convert --calibrate ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from serve_fixtures import make_tiny_qwen2

    return make_tiny_qwen2(tmp_path_factory.mktemp("calib_hf") / "qwen", hidden=64, layers=2, std=0.1)


def test_convert_calibrated_package(tiny_hf, tmp_path):
    import json

    from pocketvlm.package import convert, load_package

    text = tmp_path / "calib.txt"
    text.write_text(default_text()[:30000])
    out = convert(tiny_hf, "q4f16_1", tmp_path / "cal", progress=False, calibrate=str(text), calibration_windows=4,
                  tune_steps=2)
    q = json.loads((out / "config.json").read_text())["quantization"]
    assert q["calibration"]["windows"] == 4 and q["calibration"]["text"] == str(text)
    assert q["calibration"]["tune_steps"] == 2 and "2 steps of block-wise tuning" in q["calibration"]["method"]
    assert q["scales"] == "search" and len(q["calibration"]["text_sha256"]) == 64
    # by default, one pass of end-to-end tuning over the text's windows (all of them; GPTQ took 4)
    assert q["calibration"]["e2e_steps"] == e2etune.one_pass(q["calibration"]["e2e_windows"]) > 0
    assert q["calibration"]["e2e_windows"] > 4
    again = convert(tiny_hf, "q4f16_1", tmp_path / "cal2", progress=False, calibrate=str(text), calibration_windows=4,
                    tune_steps=2)
    a, b = load_package(out, verify=True).model, load_package(again).model
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)  # deterministic
    gptq = convert(tiny_hf, "q4f16_1", tmp_path / "gptq", progress=False, calibrate=str(text), calibration_windows=4,
                   tune_steps=0, e2e_steps=0)
    g = json.loads((gptq / "config.json").read_text())["quantization"]["calibration"]
    assert g["tune_steps"] == 0 and "tuning" not in g["method"]
    e2e = convert(tiny_hf, "q4f16_1", tmp_path / "e2e", progress=False, calibrate=str(text), calibration_windows=4,
                  tune_steps=0, e2e_steps=3)
    e = json.loads((e2e / "config.json").read_text())["quantization"]["calibration"]
    assert e["e2e_steps"] == 3 and e["method"].endswith("then 3 steps of end-to-end scale tuning")
    assert e["windows"] == 4 < e["e2e_windows"]  # the tuning takes the whole text (up to e2etune.WINDOWS), GPTQ 4
    kl = e["e2e_held_out_kl"]  # what decided whether the tuned scales were kept
    assert kl["kept"] == (kl["after"] < kl["before"]) and kl["before"] > 0
    assert load_package(e2e, verify=True).model.state_dict().keys() == a.state_dict().keys()
    plain = load_package(convert(tiny_hf, "q4f16_1", tmp_path / "plain", progress=False)).model
    assert a.state_dict().keys() == plain.state_dict().keys()  # the same format as an uncalibrated package
    assert any(not torch.equal(a.state_dict()[k], plain.state_dict()[k]) for k in a.state_dict())


@pytest.mark.parametrize("case", ["empty", "short", "missing", "binary", "q0", "windows", "tune", "e2e"])
def test_convert_calibration_bad_input_fails_before_loading(tiny_hf, tmp_path, monkeypatch, case):
    from pocketvlm import loading
    from pocketvlm.errors import PackageError
    from pocketvlm.package import convert

    monkeypatch.setattr(loading, "load", lambda *a, **k: pytest.fail("loaded the model before checking"))
    f = tmp_path / "t.txt"
    mode, kw = "q4f16_1", {}
    if case == "empty":
        f.write_text("  \n\n")
        match = "is empty"
    elif case == "short":
        f.write_text("a short calibration text. " * 10)
        match = "fewer than one window"
    elif case == "missing":
        f = tmp_path / "nope.txt"
        match = "does not exist"
    elif case == "binary":
        f.write_bytes(b"\xff\xfe\x00" * 400)
        match = "not UTF-8"
    elif case == "q0":
        f.write_text("x " * 1000)
        mode, match = "q0f16", "nothing to calibrate"
    elif case == "windows":
        f.write_text("x " * 1000)
        kw, match = {"calibration_windows": 0}, "at least 1"
    elif case == "tune":
        f.write_text("x " * 1000)
        kw, match = {"tune_steps": -1}, "--tune-steps must be 0"
    else:
        f.write_text("x " * 1000)
        kw, match = {"e2e_steps": -2}, "--e2e-steps must be 0"
    with pytest.raises((PackageError, QuantizationError), match=match):
        convert(tiny_hf, mode, tmp_path / "out", progress=False, calibrate=str(f), **kw)
    assert not (tmp_path / "out").exists()


def test_convert_calibration_too_big_for_memory(tiny_hf, tmp_path, monkeypatch):
    from pocketvlm import loading
    from pocketvlm.errors import PackageError
    from pocketvlm.package import calibration, convert

    need = calibration.calibration_bytes(tiny_hf, "q4f16_1", calibration.prepare("q4f16_1", True))
    assert need > 0
    # the default tunes end to end too: it needs at least what GPTQ and the block-wise tuning alone need
    assert calibration.calibration_bytes(tiny_hf, "q4f16_1", calibration.prepare("q4f16_1", True, e2e_steps=0)) <= need
    monkeypatch.setattr(calibration, "available_memory", lambda: need - 1)
    monkeypatch.setattr(loading, "load", lambda *a, **k: pytest.fail("loaded the model before checking"))
    with pytest.raises(PackageError, match=r"needs about .* GiB .* available"):
        convert(tiny_hf, "q4f16_1", tmp_path / "out", progress=False, calibrate=True)


def test_calibration_tokens_shorter_than_a_window(tiny_hf, tmp_path):
    from pocketvlm.package import convert

    f = tmp_path / "t.txt"
    f.write_text("The quick brown fox jumps over the lazy dog. " * 12)  # 540 bytes pass the byte check, ~120 tokens
    with pytest.raises(QuantizationError, match="fewer than one window of 512"):
        convert(tiny_hf, "q4f16_1", tmp_path / "out", progress=False, calibrate=str(f))


def test_convert_calibrated_vlm(tmp_path):
    """A LLaVA calibrates its language model on text; tower and projector stay float as always."""
    import json
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from serve_fixtures import make_tiny_llava

    from pocketvlm.package import convert, load_package

    src = make_tiny_llava(tmp_path / "llava")
    out = convert(src, "q4f16_1", tmp_path / "cal", progress=False, calibrate=True, calibration_windows=1, tune_steps=0,
                  e2e_steps=0)
    q = json.loads((out / "config.json").read_text())["quantization"]
    assert q["calibration"]["windows"] == 1
    assert not any("vision_tower" in n or "projector" in n for n in q["modules"])
    assert any("language_model" in n for n in q["modules"])
    load_package(out, verify=True)


def test_convert_vlm_calibrated_on_conversations_with_images(tmp_path, monkeypatch):
    """A LLaVA-format file calibrates a VLM on its conversations with the images: the image slots carry the
    projected features (ids with image slots and no pixels would be refused by the model)."""
    import hashlib
    import json
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from serve_fixtures import make_tiny_llava, make_tiny_qwen2

    from pocketvlm.errors import PocketVLMError
    from pocketvlm.package import calibration, convert, load_package
    from pocketvlm.scenes import write_dataset

    src = make_tiny_llava(tmp_path / "llava")
    write_dataset(tmp_path / "data", 4, seed=0, progress=False)
    data = tmp_path / "data/instruct.json"
    seen = []
    real = calibration.image_windows
    monkeypatch.setattr(calibration, "image_windows", lambda loaded, d: seen.append(real(loaded, d)) or seen[-1])
    out = convert(src, "q4f16_1", tmp_path / "cal", progress=False, calibrate=str(data), calibration_windows=3,
                  tune_steps=3)  # the tuning on image conversations: their windows are dicts of inputs
    assert len(seen[0]) == 3 and all(w["pixel_values"].shape[-1] == 32 for w in seen[0])
    image_id = json.loads((src / "config.json").read_text())["image_token_index"]
    assert all(int((w["input_ids"] == image_id).sum()) == 16 for w in seen[0])   # (32 / 8)^2 slots
    q = json.loads((out / "config.json").read_text())["quantization"]
    assert q["calibration"]["images"] and q["calibration"]["windows"] == 3
    assert q["calibration"]["data_sha256"] == hashlib.sha256(data.read_bytes()).hexdigest()
    assert not any("vision_tower" in n or "projector" in n for n in q["modules"])
    load_package(out, verify=True)

    # bad input, each refused before the model loads
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    broken = tmp_path / "broken.json"
    broken.write_text("[{")
    text_model = make_tiny_qwen2(tmp_path / "lm")
    for f, match in ((empty, "no conversation"), (broken, "not valid LLaVA JSON")):
        with pytest.raises(PocketVLMError, match=match):
            convert(src, "q4f16_1", tmp_path / "x", progress=False, calibrate=str(f))
    with pytest.raises(PocketVLMError, match="is a text model"):
        convert(text_model, "q4f16_1", tmp_path / "x", progress=False, calibrate=str(data))
    assert not (tmp_path / "x").exists()


# ----- block-wise tuning (AutoRound-style) ------------------------------------------------------------

class _Block(torch.nn.Module):
    """A decoder layer's shape in miniature: two linears around a non-linearity, a residual, extra arguments."""

    def __init__(self, d=64, h=96):
        super().__init__()
        self.up, self.down = torch.nn.Linear(d, h, bias=False), torch.nn.Linear(h, d, bias=False)

    def forward(self, x, gate, *, scale=1.0):
        return x + scale * self.down(torch.nn.functional.silu(self.up(x)) * gate)


def test_block_tuning_lowers_the_layer_error_and_keeps_the_format():
    from pocketvlm.quant.blocktune import Rounded, tune_layer

    torch.manual_seed(0)
    block = _Block()
    xs = [torch.randn(2, 32, 64) * torch.linspace(0.2, 3, 64) for _ in range(8)]
    args = [((torch.rand(96) + 0.5,), {"scale": 0.7}) for _ in xs]
    with torch.no_grad():
        ys = [block(x, *a[0], **a[1]) for x, a in zip(xs, args)]
    mode = formats.parse_mode("q4f16_1")
    rounded = {}
    for n in ("up", "down"):
        lin = getattr(block, n)
        X = torch.cat([x.reshape(-1, 64) for x in xs]) if n == "up" else torch.randn(512, 96)
        rounded[n] = Rounded(lin.weight.detach(), *gptq_quantize(lin.weight.detach(), X.t() @ X, mode), mode)
    start = {n: r.result() for n, r in rounded.items()}
    for n, r in rounded.items():  # untuned: exactly GPTQ's codes and scales
        assert torch.equal(r.weight(), formats.dequantize(*start[n], mode, getattr(block, n).in_features))
    before, after = tune_layer(block, rounded, xs, args, ys, steps=40)
    assert after < 0.95 * before
    for n, r in rounded.items():
        codes, scales = r.result()
        c0, s0 = start[n]
        assert codes.dtype == torch.uint8 and scales.dtype == mode.torch_scale_dtype and codes.shape == c0.shape
        assert (codes.long() - c0.long()).abs().max() <= 1 and int(codes.max()) <= mode.max_code
        assert ((scales.float() / s0.float() - 1).abs() <= 0.2 + 1e-3).all()
        # what is stored is exactly what was tuned (a float level just under an integer must not truncate)
        assert torch.equal(formats.dequantize(codes, scales, mode, getattr(block, n).in_features), r.weight())
    # measured independently: the block with the tuned weights, over all windows
    def err(weights):
        with torch.no_grad():
            for n, (c, s) in weights.items():
                getattr(block, n).weight.copy_(formats.dequantize(c, s, mode, getattr(block, n).in_features))
            return sum(float((block(x, *a[0], **a[1]) - y).square().mean()) for x, a, y in zip(xs, args, ys)) / len(xs)
    assert err({n: r.result() for n, r in rounded.items()}) == pytest.approx(after, rel=1e-4)
    assert err(start) == pytest.approx(before, rel=1e-4)


def test_block_tuning_never_makes_a_layer_worse():
    """With a learning rate far too high the tuned rounding is worse: the layer keeps GPTQ's."""
    from pocketvlm.quant.blocktune import Rounded, tune_layer

    torch.manual_seed(1)
    block = _Block()
    xs = [torch.randn(1, 16, 64) for _ in range(4)]
    args = [((torch.ones(96),), {}) for _ in xs]
    with torch.no_grad():
        ys = [block(x, *a[0]) for x, a in zip(xs, args)]
    mode = formats.parse_mode("q4f16_1")
    rounded = {n: Rounded(getattr(block, n).weight.detach(),
                          *formats.quantize(getattr(block, n).weight.detach(), mode, search=True), mode)
               for n in ("up", "down")}
    start = {n: r.result() for n, r in rounded.items()}
    before, after = tune_layer(block, rounded, xs, args, ys, steps=3, lr=5.0)
    assert after == before
    for n, r in rounded.items():
        assert all(torch.equal(a, b) for a, b in zip(r.result(), start[n]))


@pytest.fixture(scope="module")
def e2e_case(tiny_lm):
    """The tiny model quantized with searched scales, its calibration windows and the float teacher."""
    import copy

    from pocketvlm.quant.calibrate import _inputs
    from pocketvlm.quant.e2etune import teacher_targets

    ids = torch.tensor(tiny_lm.tokenizer.encode(default_text()[:20000]))
    windows = _inputs(calibration_windows(ids[:1536], context=96, windows=16))
    targets = teacher_targets(tiny_lm.model, windows)
    q = copy.deepcopy(tiny_lm.model)
    quantize_model(q, "q4f16_1", embeddings=True, search=True)
    return q, windows, targets, ids[1536:1536 + 256][None]


def test_end_to_end_scale_tuning_lowers_the_kl_and_keeps_codes_and_format(tiny_lm, e2e_case):
    import copy

    from pocketvlm.quant.e2etune import HOLD_OUT, SPAN, _tunable, kl_topk, teacher_targets, tune_scales

    q0, windows, targets, held_text = e2e_case
    q = copy.deepcopy(q0)
    tuned = _tunable(q)
    assert set(tuned) == {n for n, m in q.named_modules() if n.startswith("model.layers.") and hasattr(m, "scales")}
    start = {n: (m._codes_now().clone(), m.scales.clone()) for n, m in tuned.items()}
    sd0 = {k: (v.shape, v.dtype) for k, v in q.state_dict().items()}
    with torch.no_grad():  # the sparse KL against the full one: exact with every token, a lower bound with the top k
        lq, lp = torch.log_softmax(q(**windows[0])[0], -1), torch.log_softmax(tiny_lm.model(**windows[0])[0], -1)
        full = float((lp.exp() * (lp - lq)).sum(-1).mean())
        every = teacher_targets(tiny_lm.model, windows[:1], topk=lp.shape[-1])[0]
        assert float(kl_topk(q(**windows[0])[0], lp, every[1].new_tensor(range(lp.shape[-1])).expand_as(lp))) \
            == pytest.approx(full, rel=1e-4)
        assert float(kl_topk(q(**windows[0])[0], *every)) == pytest.approx(full, rel=1e-3)
        assert 0.3 * full < float(kl_topk(q(**windows[0])[0], *targets[0])) <= full * 1.001
    before, after = tune_scales(q, windows, targets, steps=28, lr=5e-3, progress=False)
    assert after < 0.9 * before
    for n, m in _tunable(q).items():
        codes, scales = m._codes_now(), m.scales
        assert torch.equal(codes, start[n][0]) and scales.dtype == start[n][1].dtype
        assert ((scales.float() / start[n][1].float() - 1).abs() <= SPAN + 1e-3).all()
    assert {k: (v.shape, v.dtype) for k, v in q.state_dict().items()} == sd0
    assert q.lm_head._embedding is q.model.embed_tokens  # the tied head is left as it was, still one table
    # measured independently, on text neither trained on nor held out
    assert _kl(tiny_lm.model, q, held_text) < 0.9 * _kl(tiny_lm.model, q0, held_text)
    # the held-out windows are every HOLD_OUT-th: measured again with the model as it now is (its own kernels,
    # int8 activations in the prefill GEMM, where the tuning multiplied dense float weights)
    held = [k for k in range(len(windows)) if k % HOLD_OUT == HOLD_OUT - 1]
    with torch.no_grad():
        again = sum(float(kl_topk(q(**windows[k])[0], *targets[k])) for k in held) / len(held)
        was = sum(float(kl_topk(q0(**windows[k])[0], *targets[k])) for k in held) / len(held)
    assert again == pytest.approx(after, rel=0.03) and was == pytest.approx(before, rel=0.03) and again < 0.9 * was


def test_end_to_end_scale_tuning_never_makes_the_model_worse(e2e_case):
    """A learning rate far too high: the held-out windows say no, and every scale stays as it was."""
    import copy

    from pocketvlm.quant.e2etune import _tunable, tune_scales

    q = copy.deepcopy(e2e_case[0])
    start = {n: m.scales.clone() for n, m in _tunable(q).items()}
    before, after = tune_scales(q, e2e_case[1], e2e_case[2], steps=4, lr=1.0, progress=False)
    assert after > before
    assert all(torch.equal(m.scales, start[n]) for n, m in _tunable(q).items())
