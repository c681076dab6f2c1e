"""Every decoder family - Llama (and Mistral), Qwen2, Gemma, Gemma 2, Gemma 3 (text), Phi-3 - against transformers
on tiny random weights (full and cached paths, RoPE scalings, sliding windows, soft-capping), the GGUF side on
synthetic files, and the real Gemma 3 270M GGUF against transformers' own GGUF loader."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pocketvlm import loading
from pocketvlm.errors import UnsupportedArchitectureError

TOL = 1e-4
VOCAB = 320


def _randomize_norms(model, std=0.3):
    # HF initialises Gemma norms to zero (and Phi-3's to one), which would hide a wrong ``1 + weight``.
    for name, p in model.named_parameters():
        if "norm" in name:
            p.data.normal_(0.0, std)


def _config(kind, **overrides):
    """(model class, config) of a tiny random model; ``overrides`` go into the Llama-like configs."""
    import transformers as T

    common = dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
                  vocab_size=VOCAB, max_position_embeddings=256)
    llama_like = {
        "llama": (T.LlamaForCausalLM, T.LlamaConfig, {}),
        "llama3-rope": (T.LlamaForCausalLM, T.LlamaConfig, dict(
            rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                          "original_max_position_embeddings": 32}, rope_theta=500000.0)),
        "llama-linear-tied": (T.LlamaForCausalLM, T.LlamaConfig,
                              dict(rope_scaling={"rope_type": "linear", "factor": 2.0}, tie_word_embeddings=True)),
        "mistral-sliding": (T.MistralForCausalLM, T.MistralConfig, dict(sliding_window=4)),
        "qwen2": (T.Qwen2ForCausalLM, T.Qwen2Config, dict(tie_word_embeddings=True)),
        "qwen2-yarn": (T.Qwen2ForCausalLM, T.Qwen2Config, dict(
            rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64})),
    }
    if kind in llama_like:
        model, config, extra = llama_like[kind]
        return model, config(**{**dict(num_hidden_layers=3, **common, **extra), **overrides})
    if kind == "gemma":
        return T.GemmaForCausalLM, T.GemmaConfig(num_hidden_layers=3, head_dim=16, **common)
    if kind == "gemma-untied":
        return T.GemmaForCausalLM, T.GemmaConfig(num_hidden_layers=2, head_dim=24, tie_word_embeddings=False,
                                                 hidden_act="gelu", **common)
    if kind == "gemma2":
        # small caps so soft-capping is active on these logits; a scalar unlike head_dim
        return T.Gemma2ForCausalLM, T.Gemma2Config(
            num_hidden_layers=4, head_dim=16, sliding_window=4, query_pre_attn_scalar=12,
            attn_logit_softcapping=1.5, final_logit_softcapping=2.0, initializer_range=0.2, **common)
    if kind == "gemma3":
        return T.Gemma3ForCausalLM, T.Gemma3TextConfig(
            num_hidden_layers=4, head_dim=16, sliding_window=4, query_pre_attn_scalar=20,
            layer_types=["sliding_attention", "full_attention", "sliding_attention", "sliding_attention"],
            rope_parameters={"full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 50000.0},
                             "sliding_attention": {"rope_type": "default", "rope_theta": 300.0}},
            initializer_range=0.1, **common)
    if kind == "gemma3-softcap":
        return T.Gemma3ForCausalLM, T.Gemma3TextConfig(
            num_hidden_layers=3, head_dim=16, sliding_window=4, final_logit_softcapping=1.0,
            attn_logit_softcapping=0.5,  # HF's Gemma 3 ignores this one; so must we
            layer_types=["sliding_attention", "full_attention", "sliding_attention"], initializer_range=0.2,
            **common)
    # settings a GGUF file can express (it has no query_pre_attn_scalar, layer_types or local RoPE base:
    # llama.cpp uses head_dim, one global layer in 2 (Gemma 2) or 6 (Gemma 3), and 10k)
    if kind == "gemma2-gguf":
        return T.Gemma2ForCausalLM, T.Gemma2Config(
            num_hidden_layers=4, head_dim=16, sliding_window=4, query_pre_attn_scalar=16,
            attn_logit_softcapping=1.5, final_logit_softcapping=2.0, initializer_range=0.2, **common)
    if kind == "gemma3-gguf":
        return T.Gemma3ForCausalLM, T.Gemma3TextConfig(
            num_hidden_layers=7, head_dim=16, sliding_window=4, query_pre_attn_scalar=16,
            rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 50000.0},
                             "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}},
            initializer_range=0.1, **common)
    if kind == "phi3":
        rot = 16 // 2  # partial_rotary_factor 0.5 of head_dim 16
        return T.Phi3ForCausalLM, T.Phi3Config(
            num_hidden_layers=3, original_max_position_embeddings=64, pad_token_id=0, bos_token_id=1,
            eos_token_id=2, rope_parameters={
                "rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
                "short_factor": [1.0 + 0.3 * i for i in range(rot // 2)],
                "long_factor": [2.0 + i for i in range(rot // 2)]}, **common)
    if kind == "phi3-sliding":
        return T.Phi3ForCausalLM, T.Phi3Config(num_hidden_layers=2, sliding_window=4, pad_token_id=0,
                                               bos_token_id=1, eos_token_id=2, tie_word_embeddings=True, **common)
    raise KeyError(kind)


def tiny(kind, tmp_path, legacy_config=None, **overrides):
    """A random-weight transformers model saved to ``tmp_path`` and loaded back by both libraries."""
    import transformers

    torch.manual_seed(0)
    cls, cfg = _config(kind, **overrides)
    ref = cls(cfg).eval()
    _randomize_norms(ref)
    ref.save_pretrained(tmp_path)
    if legacy_config is not None:  # rewrite config.json in an older style; both sides must read it alike
        d = json.loads((tmp_path / "config.json").read_text())
        (tmp_path / "config.json").write_text(json.dumps(legacy_config(d)))
        ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    return ref, loading.load(tmp_path).model


_BUILT = {}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """tiny(kind) once per kind for this module (the full, cached and embeds tests share them)."""
    def get(kind):
        if kind not in _BUILT:
            _BUILT[kind] = tiny(kind, tmp_path_factory.mktemp(kind))
        return _BUILT[kind]
    yield get
    _BUILT.clear()


KINDS = ["llama", "llama3-rope", "llama-linear-tied", "mistral-sliding", "qwen2", "qwen2-yarn",
         "gemma", "gemma-untied", "gemma2", "gemma3", "gemma3-softcap", "phi3", "phi3-sliding"]


def _check_full(ref, ours, S=14):
    ids = torch.randint(0, VOCAB, (2, S))
    mask = torch.ones(2, S, dtype=torch.long)
    mask[1, 9:] = 0  # second sequence is shorter (right padding)
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask).logits
        got = ours(ids, attention_mask=mask)
    assert (want[0] - got[0]).abs().max() < TOL
    assert (want[1, :9] - got[1, :9]).abs().max() < TOL
    return want


@pytest.mark.parametrize("kind", KINDS)
def test_full_forward_matches_transformers(kind, built):
    ref, ours = built(kind)
    want = _check_full(ref, ours)
    if kind in ("gemma2", "gemma3-softcap"):  # the final cap really bites on these logits
        assert want.abs().max() > 0.5 * ref.config.final_logit_softcapping


@pytest.mark.parametrize("kind", KINDS)
def test_cached_decode_matches_full_forward(kind, built):
    ref, ours = built(kind)
    ids = torch.randint(0, VOCAB, (1, 13))
    with torch.no_grad():
        want = ours(ids)
        cache = ours.make_cache(1, 32)
        outs = [ours(ids[:, :5], input_pos=torch.arange(5), cache=cache)]
        for i in range(5, 13):
            outs.append(ours(ids[:, i:i + 1], input_pos=torch.tensor([i]), cache=cache))
    assert (torch.cat(outs, 1) - want).abs().max() < TOL
    assert (want - ref(input_ids=ids).logits).abs().max() < TOL


def test_chunked_prefill_with_attend_len(built):
    """The engine's eager path attends only over the filled prefix; same logits as the static full cache."""
    ref, ours = built("qwen2")
    ids = torch.randint(0, VOCAB, (1, 11))
    with torch.no_grad():
        want = ref(input_ids=ids).logits
        cache = ours.make_cache(1, 64)
        outs = []
        for s, e in [(0, 4), (4, 8), (8, 11)]:
            cache.attend_len = e
            outs.append(ours(ids[:, s:e], input_pos=torch.arange(s, e), cache=cache))
    assert (torch.cat(outs, 1) - want).abs().max() < TOL


def test_gguf_unpermute_inverts_llamacpp_permute():
    from pocketvlm.models.llama import unpermute_qk

    w = torch.randn(8 * 6, 5)
    n_head = 6
    # llama.cpp's converter: reshape(n_head, 2, rows/n_head/2, ...) then swap the two inner axes
    permuted = w.reshape(n_head, 2, w.shape[0] // n_head // 2, 5).swapaxes(1, 2).reshape(w.shape)
    assert torch.equal(unpermute_qk(permuted, n_head), w)


@pytest.mark.parametrize("kind", ["gemma", "gemma3"])
def test_inputs_embeds_path_matches_transformers(kind, built):
    """get_input_embeddings() is the scaled lookup (as HF's); inputs_embeds are used unscaled (as HF does)."""
    ref, ours = built(kind)
    ids = torch.randint(0, VOCAB, (1, 9))
    with torch.no_grad():
        e_ref = ref.get_input_embeddings()(ids)
        e_ours = ours.get_input_embeddings()(ids)
        assert (e_ref - e_ours).abs().max() < 1e-6
        extra = torch.randn(1, 2, 64)  # e.g. image features spliced in by a VLM
        want = ref(inputs_embeds=torch.cat([e_ref, extra], 1)).logits
        got = ours(inputs_embeds=torch.cat([e_ours, extra], 1))
    assert (want - got).abs().max() < TOL


def test_embedding_scale_survives_quantized_embedding_swap(tmp_path):
    """The sqrt(hidden) scale lives in the text model, not in the module class, so swapping ``embed_tokens``
    for a quantized embedding (and the tied head for its view) keeps it: int8 logits stay close."""
    from pocketvlm.quant import QuantEmbedding, quantize_model

    ref, _ = tiny("gemma3", tmp_path)
    ours = loading.load(tmp_path).model
    ids = torch.randint(0, VOCAB, (1, 10))
    with torch.no_grad():
        want = ref(input_ids=ids).logits
        quantize_model(ours, "q8f16_1", embeddings=True)
        assert isinstance(ours.model.embed_tokens, QuantEmbedding)
        got = ours(ids)
        e = ours.get_input_embeddings()(ids)
    assert (e - ref.get_input_embeddings()(ids)).abs().max() < 0.02 * e.abs().max()
    assert (got - want).abs().max() < 0.05 * want.abs().max()


def _gemma3_legacy(d):
    """The pre-transformers-5 Gemma 3 config style: rope_theta / rope_local_base_freq / rope_scaling and
    sliding_window_pattern instead of rope_parameters and layer_types."""
    d = dict(d)
    rp = d.pop("rope_parameters")
    d.pop("layer_types")
    d["rope_theta"] = rp["full_attention"]["rope_theta"]
    d["rope_local_base_freq"] = rp["sliding_attention"]["rope_theta"]
    d["rope_scaling"] = {"rope_type": "linear", "factor": rp["full_attention"]["factor"]}
    d["sliding_window_pattern"] = 2
    return d


@pytest.mark.parametrize("kind", ["gemma", "gemma3"])
def test_bfloat16_as_accurate_as_transformers(kind, tmp_path):
    """In bf16 (embedding scale rounded to bf16 as HF does) our logits are as close to the fp32 reference as
    HF's own bf16 logits are; a bf16 mismatch in the Gemma norms or scales would show up as a larger error."""
    ref, _ = tiny(kind, tmp_path)
    ours = loading.load(tmp_path, dtype="bfloat16").model
    ids = torch.randint(0, VOCAB, (1, 12))
    with torch.no_grad():
        exact = ref(input_ids=ids).logits
        hf_bf16 = ref.to(torch.bfloat16)(input_ids=ids).logits
        got = ours(ids)
    assert got.dtype == hf_bf16.dtype == torch.bfloat16
    hf_err = (hf_bf16.float() - exact).abs().max()
    our_err = (got.float() - exact).abs().max()
    assert our_err <= 1.5 * hf_err + 1e-2


def test_gemma3_legacy_config_style(tmp_path):
    ref, ours = tiny("gemma3", tmp_path, legacy_config=_gemma3_legacy)
    assert ref.config.layer_types == ["sliding_attention", "full_attention"] * 2  # HF read the pattern
    assert [layer.layer_type for layer in ours.model.layers] == ref.config.layer_types
    _check_full(ref, ours)


def _phi3_legacy(d):
    d = dict(d)
    rp = d.pop("rope_parameters")
    d["rope_theta"] = rp.pop("rope_theta")
    d["partial_rotary_factor"] = rp.pop("partial_rotary_factor")
    d["rope_scaling"] = {"type": "longrope", "short_factor": rp["short_factor"], "long_factor": rp["long_factor"]}
    return d


def test_phi3_legacy_rope_scaling_config(tmp_path):
    ref, ours = tiny("phi3", tmp_path, legacy_config=_phi3_legacy)
    assert ours.config.rope["rope_type"] == "longrope"
    _check_full(ref, ours)


def test_phi3_long_factors_chosen_by_max_seq_len(tmp_path):
    """Past original_max_position_embeddings (64) the long factors apply: same as HF on a 70-token input."""
    ref, _ = tiny("phi3", tmp_path)
    ours = loading.load(tmp_path, max_seq_len=128).model
    ids = torch.randint(0, VOCAB, (1, 70))
    with torch.no_grad():
        want = ref(input_ids=ids).logits
        got = ours(ids)
    assert (want - got).abs().max() < TOL


def test_gemma3_bidirectional_is_refused():
    from pocketvlm.models import gemma3

    d = dict(model_type="gemma3_text", vocab_size=10, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
             num_attention_heads=1, use_bidirectional_attention=True)
    with pytest.raises(UnsupportedArchitectureError, match="causal"):
        gemma3.Config.from_dict(d)


# --- GGUF ---------------------------------------------------------------------------------------------

def _write_gguf(path, arch, meta, tensors):
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    for k, v in meta.items():
        if isinstance(v, float):
            w.add_float32(k, v)
        elif isinstance(v, int):
            w.add_uint32(k, v)
    w.add_array("tokenizer.ggml.tokens", [f"t{i}" for i in range(VOCAB)])
    for name, t in tensors.items():
        w.add_tensor(name, np.ascontiguousarray(t.detach().float().numpy()))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _to_llamacpp(sd, fam, gemma_norms):
    """An HF state dict renamed (and, for Gemma, norm-folded) the way llama.cpp's converter writes it."""
    inv = {}
    for g, h in fam.GGUF_TENSORS.items():
        inv[h] = g
    out = {}
    for name, t in sd.items():
        layer = name.split(".")[2] if name.startswith("model.layers.") else None
        key = name.replace(f".{layer}.", ".{i}.", 1) if layer is not None else name
        g = inv[key].replace("{i}", layer) if layer is not None else inv[key]
        out[g] = t + 1.0 if gemma_norms and name.endswith("norm.weight") else t
    return out


@pytest.mark.parametrize("kind,arch", [("gemma", "gemma"), ("gemma2-gguf", "gemma2"), ("gemma3-gguf", "gemma3"),
                                       ("phi3-sliding", "phi3")])
def test_gguf_from_llamacpp_layout_matches_transformers(kind, arch, tmp_path):
    """A synthetic GGUF in llama.cpp's layout (names, +1 norms, metadata keys) loads to the same logits."""
    from pocketvlm.models import registry

    ref, _ = tiny(kind, tmp_path)
    c = ref.config
    fam = registry.gguf_family(arch)
    sd = {k: v for k, v in ref.state_dict().items() if k != "lm_head.weight" or not c.tie_word_embeddings}
    meta = {f"{arch}.embedding_length": c.hidden_size, f"{arch}.feed_forward_length": c.intermediate_size,
            f"{arch}.block_count": c.num_hidden_layers, f"{arch}.attention.head_count": c.num_attention_heads,
            f"{arch}.attention.head_count_kv": c.num_key_value_heads, f"{arch}.context_length": 256,
            f"{arch}.attention.layer_norm_rms_epsilon": float(c.rms_norm_eps)}
    if arch.startswith("gemma"):
        meta[f"{arch}.attention.key_length"] = c.head_dim
    if arch in ("gemma2", "gemma3"):
        meta[f"{arch}.attention.sliding_window"] = c.sliding_window
    if arch == "gemma":
        meta["gemma.rope.freq_base"] = float(c.rope_parameters["rope_theta"])
    if arch == "gemma2":
        meta["gemma2.attn_logit_softcapping"] = float(c.attn_logit_softcapping)
        meta["gemma2.final_logit_softcapping"] = float(c.final_logit_softcapping)
        meta["gemma2.rope.freq_base"] = float(c.rope_parameters["rope_theta"])
    if arch == "phi3":
        meta["phi3.attention.sliding_window"] = c.sliding_window
        meta["phi3.rope.freq_base"] = float(c.rope_parameters["rope_theta"])
    if arch == "gemma3":
        meta["gemma3.rope.freq_base"] = float(c.rope_parameters["full_attention"]["rope_theta"])
    f = tmp_path / "m.gguf"
    _write_gguf(f, arch, meta, _to_llamacpp(sd, fam, arch.startswith("gemma")))
    ours = loading.load(f).model
    want_types = getattr(c, "layer_types", None) or [
        "sliding_attention" if getattr(c, "sliding_window", None) else "full_attention"] * c.num_hidden_layers
    assert [layer.layer_type for layer in ours.model.layers] == list(want_types)
    _check_full(ref, ours)


def test_phi3_gguf_with_longrope_factors_is_refused():
    from pocketvlm.models import phi3

    cfg = phi3.Config.from_dict(dict(model_type="phi3", vocab_size=10, hidden_size=8, intermediate_size=8,
                                     num_hidden_layers=1, num_attention_heads=1))
    with pytest.raises(UnsupportedArchitectureError, match="LongRoPE"):
        phi3.gguf_sanitize({"rope_factors_long.weight": torch.ones(4)}, cfg)


# --- the real Gemma 3 270M (Q4_K_M) against transformers' GGUF loader ------------------------------------

@pytest.fixture(scope="module")
def gemma3_pair(gemma3_gguf):
    """(our model, transformers' model, the parsed GGUF) for the real Gemma 3 270M, loaded once."""
    import gguf
    import transformers

    real_reader = gguf.GGUFReader
    reader = real_reader(str(gemma3_gguf))

    def shared(path, *args, **kwargs):
        return reader if Path(path) == Path(gemma3_gguf) else real_reader(path, *args, **kwargs)

    # Parsing the 262k-token vocabulary dominates a load and transformers parses the file twice (config,
    # then weights): every reader here shares one parse of the same read-only file.
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gguf, "GGUFReader", shared)
        ours = loading.load(gemma3_gguf)
        ref = transformers.AutoModelForCausalLM.from_pretrained(
            str(gemma3_gguf.parent), gguf_file=gemma3_gguf.name, dtype=torch.float32).eval()
    return ours, ref, reader


@pytest.mark.slow
def test_real_gemma3_270m_gguf_matches_transformers(gemma3_pair):
    from pocketvlm.tokenizer import Tokenizer

    ours, ref, reader = gemma3_pair
    cfg = ours.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.n_kv_heads, cfg.dim_head,
            cfg.sliding_window) == (18, 640, 4, 1, 256, 512)
    full = [i for i, layer in enumerate(ours.model.model.layers) if layer.layer_type == "full_attention"]
    assert full == [5, 11, 17]
    ids = torch.tensor([Tokenizer.from_gguf(reader).encode("The capital of France is")])
    assert ids[0, 0] == 2  # <bos>
    with torch.no_grad():
        want = ref(input_ids=ids).logits[0, -1]
        got = ours.model(ids)[0, -1]
    assert got.argmax() == want.argmax()
    assert (got - want).abs().max() < 5e-4  # logits span about +-20
