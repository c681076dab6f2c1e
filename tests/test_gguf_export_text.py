"""GGUF export of the Gemma (1, 2, 3) and Phi-3 language models with sentencepiece-style vocabularies: tiny random
transformers models with a real sentencepiece BPE tokenizer, and the real Gemma 3 270M. llama.cpp's own
``llama-completion`` (built by benchmarks/build_llamacpp.sh) must tokenize and answer as pocketvlm does, and
pocketvlm's GGUF loader must read the export back to the source's logits."""
from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pytest
import torch

import pocketvlm
from pocketvlm.errors import UnsupportedArchitectureError
from pocketvlm.export import export_gguf
from pocketvlm.export.llamacpp import completion

PROMPTS = ["The quick brown fox", "def fibonacci(n):\n    return", "Les élèves étudient à 123"]
# spaces (runs of them), newlines, tabs, unicode, digits, a special token in the text
STRINGS = ["Hello world, 123 héllo\n x", "  indented   spaces\tand tabs\n\nnewlines 4567890",
           "Über naïve café — 12.5%", "<start_of_turn>user\nHi there<end_of_turn>\n"]
TEXT = ["The quick brown fox jumps over the lazy dog. 123 456 7890.", "Hello world! How are you today?",
        "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)",
        "Les élèves étudient à l'école. Über naïve café.", "  indented   spaces\tand tabs\n\nnewlines"] * 20


@pytest.fixture(scope="module")
def llama_completion(llamacpp_tool):
    return llamacpp_tool("llama-completion")


def write_sentencepiece_tokenizer(d: Path, style: str) -> int:
    """A real sentencepiece BPE model with byte fallback trained on a few lines, with the ``tokenizer.json``
    transformers converts from it (GemmaTokenizer: no dummy prefix, <start_of_turn>/<end_of_turn>; LlamaTokenizer
    as Phi-3 uses it: a dummy prefix); returns the vocabulary size."""
    import sentencepiece as spm
    import transformers

    d.mkdir(parents=True, exist_ok=True)
    gemma = style == "gemma"
    buf = io.BytesIO()
    names = dict(pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>") if gemma else {}
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(TEXT), model_writer=buf, vocab_size=400, model_type="bpe", byte_fallback=True,
        character_coverage=1.0, add_dummy_prefix=not gemma, remove_extra_whitespaces=False, split_digits=True,
        allow_whitespace_only_pieces=True, normalization_rule_name="identity", minloglevel=2,
        user_defined_symbols=["<start_of_turn>", "<end_of_turn>"], pad_id=0, eos_id=1, bos_id=2, unk_id=3, **names)
    (d / "tokenizer.model").write_bytes(buf.getvalue())
    cls = "GemmaTokenizer" if gemma else "LlamaTokenizer"
    specials = dict(bos_token="<bos>", eos_token="<eos>") if gemma else dict(bos_token="<s>", eos_token="</s>")
    (d / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": cls, "unk_token": "<unk>",
                                                         "pad_token": "<pad>", "add_bos_token": True, **specials}))
    tok = transformers.AutoTokenizer.from_pretrained(d)
    tok.save_pretrained(d)
    return len(tok)


def _configs(vocab: int):
    import transformers as T

    common = dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
                  vocab_size=vocab, max_position_embeddings=256, pad_token_id=0, eos_token_id=1, bos_token_id=2)
    return {
        "gemma": (T.GemmaForCausalLM, T.GemmaConfig(num_hidden_layers=2, head_dim=16, initializer_range=0.2, **common)),
        # a layer pattern unlike llama.cpp's default (every other layer), a window of 4 tokens, both caps active
        "gemma2": (T.Gemma2ForCausalLM, T.Gemma2Config(
            num_hidden_layers=3, head_dim=16, sliding_window=4, query_pre_attn_scalar=16,
            layer_types=["full_attention", "sliding_attention", "sliding_attention"],
            attn_logit_softcapping=5.0, final_logit_softcapping=8.0, initializer_range=0.2, **common)),
        # q/k norms, local RoPE base 300, linear scaling on the global layer, a final cap
        "gemma3": (T.Gemma3ForCausalLM, T.Gemma3TextConfig(
            num_hidden_layers=4, head_dim=16, sliding_window=4, query_pre_attn_scalar=16,
            layer_types=["sliding_attention", "full_attention", "sliding_attention", "sliding_attention"],
            rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 50000.0},
                             "sliding_attention": {"rope_type": "default", "rope_theta": 300.0}},
            final_logit_softcapping=8.0, initializer_range=0.2, **common)),
        # fused qkv / gate_up, half of each head rotated, its own lm_head
        "phi3": (T.Phi3ForCausalLM, T.Phi3Config(
            num_hidden_layers=2, tie_word_embeddings=False, partial_rotary_factor=0.5, initializer_range=0.2,
            original_max_position_embeddings=256, **common)),
    }


def make_tiny(d: Path, family: str, seed: int = 0) -> Path:
    """A tiny random transformers model of ``family`` with the sentencepiece tokenizer of its kind (norms
    randomized so that a missing ``1 + weight`` shows)."""
    vocab = write_sentencepiece_tokenizer(d, "llama" if family == "phi3" else "gemma")
    torch.manual_seed(seed)
    cls, cfg = _configs(vocab)[family]
    model = cls(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0.0, 0.3)
    model.save_pretrained(d)
    return d


FAMILIES = ["gemma", "gemma2", "gemma3", "phi3"]


@pytest.fixture(scope="module", params=FAMILIES)
def exported(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(request.param)
    src = make_tiny(d / "hf", request.param)
    # not named "phi3": llama.cpp gives files whose general.name says Phi-3 the special-token attributes of the
    # real Phi-3 vocabulary, and fails to load a vocabulary without its <|endoftext|> (llama-vocab.cpp)
    files = {kind: export_gguf(src, d / kind, type=kind, name="tiny", progress=False)["model"]
             for kind in ("f32", "f16")}
    return {"family": request.param, "dir": d, "src": src, **files}


def test_export_writes_llama_cpp_keys(exported):
    from pocketvlm.loading.gguf_file import read_gguf

    g = read_gguf(exported["f16"])
    meta, fam = g.metadata, exported["family"]
    names = {t.name for t in g.tensors}
    assert meta["general.architecture"] == fam
    assert meta["tokenizer.ggml.model"] == "llama" and len(meta["tokenizer.ggml.scores"]) == len(
        meta["tokenizer.ggml.tokens"])
    tokens, types = list(meta["tokenizer.ggml.tokens"]), list(meta["tokenizer.ggml.token_type"])
    assert types[tokens.index("<0x41>")] == 6 and types[tokens.index("<start_of_turn>")] in (3, 4)
    assert meta["tokenizer.ggml.add_space_prefix"] is (fam == "phi3")
    if fam == "phi3":
        assert {"blk.0.attn_qkv.weight", "blk.0.ffn_up.weight", "output.weight"} <= names
        assert meta["phi3.rope.dimension_count"] == 8 and meta["phi3.rope.scaling.original_context_length"] == 256
    else:
        assert "output.weight" not in names and meta[f"{fam}.attention.key_length"] == 16
    if fam == "gemma2":
        assert list(meta["gemma2.attention.sliding_window_pattern"]) == [False, True, True]
        assert meta["gemma2.attn_logit_softcapping"] == 5.0
    if fam == "gemma3":
        assert {"blk.0.attn_q_norm.weight", "blk.0.attn_k_norm.weight"} <= names
        assert meta["gemma3.rope.freq_base_swa"] == 300.0 and meta["gemma3.rope.scaling.factor"] == 2.0
    norms = {t.name: t for t in g.tensors if t.name.endswith("norm.weight")}
    assert all(t.tensor_type.name == "F32" for t in norms.values())


@pytest.mark.parametrize("kind,tol", [("f32", 1e-5), ("f16", 2e-2)])
def test_roundtrip_logits(exported, kind, tol):
    """pocketvlm's GGUF loader reads the export back to the source model's logits (f32: float rounding; f16:
    float16 tolerance)."""
    ref = pocketvlm.load(exported["src"])
    got = pocketvlm.load(exported[kind], quantization="q0f32")
    for text in STRINGS:
        ids = ref.tokenizer.encode(text)
        want, have = ref.logits(torch.tensor([ids])), got.logits(torch.tensor([ids]))
        assert (have - want).abs().max().item() / want.abs().max().item() < tol, text


@pytest.mark.parametrize("kind", ["f32", "f16"])
def test_llama_cpp_answers_and_tokenizes_as_pocketvlm(exported, llama_completion, kind):
    """llama.cpp on the exported file: the prompt's token ids are pocketvlm's, and its greedy continuation is
    pocketvlm's on the same file, token for token (the bytes llama-completion prints against the pieces of
    pocketvlm's tokens)."""
    model = pocketvlm.load(exported[kind], quantization="q0f32")
    for prompt in PROMPTS:
        ours = greedy_ids(model, prompt, 12)
        theirs, ids = completion(exported[kind], prompt, n_predict=12, exe=llama_completion)
        assert ids == model.tokenizer.encode(prompt), prompt
        assert theirs.encode("utf-8", "surrogateescape") == printed(model.tokenizer, ours), (prompt, theirs, ours)
        assert len(ours) >= 8  # not an early stop on both sides


def greedy_ids(model, prompt: str, n: int) -> list[int]:
    """pocketvlm's greedy tokens for a raw prompt (the stop token it may end on included)."""
    return [ev.token for ev in model.run(model.text_prompt(prompt), max_tokens=n, temperature=0)]


def printed(tok, ids: list[int]) -> bytes:
    """What llama-completion prints for these generated tokens: each piece's bytes (``<0xNN>`` one byte, "▁" a
    space); control tokens and the end-of-generation token print nothing."""
    out = b""
    for i in ids:
        piece = tok.id_to_token(i)
        if i in tok.eos_token_ids or tok.is_special(i):
            continue
        out += bytes([int(piece[3:5], 16)]) if len(piece) == 6 and piece.startswith("<0x") else \
            piece.replace("\u2581", " ").encode()
    return out


def test_tokenizer_like_llama_cpp(exported, llama_completion):
    """Spaces, newlines, tabs, unicode, digits and special tokens: llama.cpp's tokenizer on the exported
    vocabulary gives the ids of pocketvlm's tokenizer rebuilt from the file, and of the sentencepiece model
    itself; the same for a folder with tokenizer.json only (scores from its merges). Gemma: all of these are
    the source folder's ids. Phi-3 (Llama-style): transformers' tokenizer.json differs from its own
    sentencepiece model on a run of leading spaces (its merges list lacks pairs sentencepiece merges, which
    llama.cpp's scored merging cannot leave out) and after a special token (llama.cpp and pocketvlm's Phi-3
    tokenizer put the "▁" prefix there too); there the export follows the sentencepiece model, as llama.cpp's
    converter does."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(exported["src"] / "tokenizer.model"))
    ref = pocketvlm.load(exported["src"]).tokenizer
    got = pocketvlm.load(exported["f32"], quantization="q0f32").tokenizer
    only_json = exported["dir"] / "json-only"
    if not only_json.exists():
        shutil.copytree(exported["src"], only_json)
        (only_json / "tokenizer.model").unlink()
    out = export_gguf(only_json, exported["dir"] / "json", type="f32", name="tiny", progress=False)["model"]
    got_json = pocketvlm.load(out, quantization="q0f32").tokenizer
    gemma = exported["family"] != "phi3"
    for text in STRINGS:
        ids = completion(exported["f32"], text, n_predict=1, exe=llama_completion)[1]
        ids_json = completion(out, text, n_predict=1, exe=llama_completion)[1]
        assert ids == got.encode(text) and ids_json == got_json.encode(text), text
        if "<" not in text:
            assert ids == [got.bos_token_id] + sp.encode(text), text
        if gemma:
            assert ids == ids_json == ref.encode(text), text
        else:  # the scores from transformers' merges give what the sentencepiece scores give
            assert ids_json == ids, text


# --- the real Gemma 3 270M ---------------------------------------------------------------------------------

@pytest.mark.slow
def test_real_gemma3_q8_0_answers_as_pocketvlm(gemma3_gguf, llama_completion, tmp_path):
    """The real Gemma 3 270M (its GGUF, q4_k_m, dequantized) exported at q8_0: llama.cpp's greedy answer equals
    pocketvlm's on the exported file, and both tokenize the prompt alike (the vocabulary carried over)."""
    out = export_gguf(gemma3_gguf, tmp_path, type="q8_0", name="g", progress=False)["model"]
    model = pocketvlm.load(out, context_window_size=512)
    for prompt in ("The capital of France is", "def add(a, b):\n    return"):
        ours = model.generate(prompt, max_tokens=16, temperature=0)
        theirs, ids = completion(out, prompt, n_predict=16, exe=llama_completion)
        assert ids == model.tokenizer.encode(prompt)
        assert theirs == ours and len(ours.strip()) > 5, (prompt, theirs, ours)


# --- what llama.cpp cannot run -----------------------------------------------------------------------------

def _cfg(family: str, **kw):
    from pocketvlm.models import registry

    d = dict(model_type=family, vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
             num_attention_heads=4, head_dim=16, **kw)
    return registry.family(family).Config.from_dict(d)


@pytest.mark.parametrize("family,kw,match", [
    ("gemma", dict(tie_word_embeddings=False), "its own lm_head"),
    ("gemma2", dict(query_pre_attn_scalar=12), r"query_pre_attn_scalar=12.*1/sqrt\(16\)"),
    ("phi3", dict(rope_scaling={"rope_type": "longrope", "short_factor": [1.0] * 4, "long_factor": [2.0] * 4,
                                "original_max_position_embeddings": 64}), "LongRoPE"),
])
def test_refused_with_the_reason(family, kw, match):
    from pocketvlm.export.gguf_text import check_exportable

    with pytest.raises(UnsupportedArchitectureError, match=match):
        check_exportable(_cfg(family, **kw))
