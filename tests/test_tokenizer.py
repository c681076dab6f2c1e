"""pocketvlm.tokenizer against transformers on the two real GGUF files, a synthetic llama/SPM GGUF and
a tiny Hugging Face tokenizer folder; StreamDecoder; bad input."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from pocketvlm.errors import ConfigError, CorruptWeightsError, ModelNotFoundError, UnsupportedArchitectureError
from pocketvlm.tokenizer import StreamDecoder, Tokenizer

MIXED = (
    "The quick brown fox jumps over the lazy dog. It's 3:45pm; we've 1,234,567.89 reasons, don't we?\n"
    "Mr. O'Neil said: \"Hello,   world!\"  \t Tabs\tand  double  spaces.\n\n\n"
    "def fib(n: int) -> int:\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n\n"
    "for (int i = 0; i < 10; ++i) { printf(\"%d\\n\", i); }  // C code\n"
    "    indented    line   \r\n  windows line\r\n"
    "Numbers: 0 7 42 1000 3.14159 -273.15 1e-9 0xFF 2024-11-22 12345678901234567890\n"
    "中文文本：我爱北京天安门。日本語のテキスト、カタカナ。한국어 문장입니다.\n"
    "Emoji: 😀 👍🏽 👨‍👩‍👧‍👦 🇫🇷 ❤️ 🤖🚀✨ and 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 math 𝑥² ∑ ∫ √ ≠ ≤\n"
    "Accents: café naïve résumé Ångström Zürich São Paulo Ελληνικά Русский текст\n"
    "RTL: العربية نص عربي مع أرقام 123 و עברית טקסט\n"
    "Special tokens inline: <|im_start|>user\nhi<|im_end|> and <start_of_turn>model\nok<end_of_turn> <bos><eos> <|endoftext|>\n"
    "Trailing spaces   \n   leading spaces and a lone tab\t\n"
    "Weird: \u200b zero-width, \u00a0 nbsp, combining e\u0301, fullwidth ＡＢＣ１２３, ellipsis… “quotes” — dash\n"
    "<tool_call>{\"name\": \"f\", \"arguments\": {}}</tool_call> [multimodal] <start_of_image>\n"
    "हिन्दी पाठ, ภาษาไทยไม่มีช่องว่าง, Tiếng Việt có dấu, עִבְרִית עם ניקוד, ﷽, Ⅻ ½ ① ℃ ™\n"
    "class Foo(Base):\n\tdef __init__(self, x=None, *args, **kw):\n\t\tself.x = x or {'a': [1, 2.5e-3]}\n"
    "SELECT id, name FROM users WHERE age >= 18 AND email LIKE '%@example.com' ORDER BY id DESC;\n"
    "    \n\n\n\n      \t\t  \n"
    "URLs: https://example.com/path?q=1&r=two#frag  mail: someone@example.org  path: C:\\Users\\me\n"
)
MIXED = MIXED * 2 + "  final line without newline ends here 😀"
PIECES = [MIXED] + MIXED.split("\n") + ["", " ", "  ", "\n", " leading", "😀", "<|im_start|>", "<start_of_turn>"]
STREAM_TEXT = "Hi 😀👨‍👩‍👧 中文字符 ÅngströmΩ 🇫🇷 𝔘𝔫𝔦 done\n  ok"


def hf_gguf_tokenizer(gguf_path: Path):
    """transformers' own tokenizer for a GGUF file.

    Converting a GGUF tokenizer takes transformers 30-40 s, so its result (the backend
    tokenizer.json it built, plus its special tokens and chat template) is cached under
    ~/.cache/pocketvlm/hf_reference, keyed by transformers version and file size/mtime, and reloaded
    as a generic PreTrainedTokenizerFast, which uses that backend verbatim.
    """
    import tokenizers
    import transformers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    from pocketvlm.real_models import cache_dir

    st = gguf_path.stat()
    key = f"{gguf_path.stem}-{transformers.__version__}-{tokenizers.__version__}-{st.st_size}-{int(st.st_mtime)}"
    folder = cache_dir() / "hf_reference" / key
    if not (folder / "meta.json").is_file():
        hf = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        folder.mkdir(parents=True, exist_ok=True)
        hf.backend_tokenizer.save(str(folder / "tokenizer.json"))
        meta = {k: getattr(hf, k) for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
        meta["chat_template"] = hf.chat_template
        (folder / "meta.json").write_text(json.dumps(meta))
    meta = json.loads((folder / "meta.json").read_text())
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json")),
        **{k: v for k, v in meta.items() if v is not None},
    )


@pytest.fixture(scope="module")
def qwen_pair(qwen_gguf):
    return Tokenizer.from_gguf(qwen_gguf), hf_gguf_tokenizer(qwen_gguf)


@pytest.fixture(scope="module")
def gemma_pair(gemma3_gguf):
    return Tokenizer.from_gguf(gemma3_gguf), hf_gguf_tokenizer(gemma3_gguf)


@pytest.fixture(params=["qwen", "gemma"])
def pair(request):
    return request.getfixturevalue(f"{request.param}_pair")


def test_mixed_text_encodes_like_transformers(pair):
    mine, hf = pair
    assert len(MIXED) > 2000
    for text in PIECES:
        for special in (True, False):
            assert mine.encode(text, add_special_tokens=special) == hf(text, add_special_tokens=special).input_ids, (
                text, special)


def test_decode_like_transformers(pair):
    mine, hf = pair
    ids = mine.encode(MIXED)
    for skip in (False, True):
        assert mine.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)
    # Special tokens written in the text stay whole, and survive a round trip.
    assert mine.decode(mine.encode(MIXED, add_special_tokens=False)) == MIXED


def test_special_token_facts(qwen_pair, gemma_pair):
    q, hq = qwen_pair
    g, hg = gemma_pair
    assert (q.bos_token, q.eos_token) == (hq.bos_token, hq.eos_token) == ("<|endoftext|>", "<|im_end|>")
    assert (g.bos_token, g.eos_token) == (hg.bos_token, hg.eos_token) == ("<bos>", "<eos>")
    assert not q.add_bos_token and q.encode("hi")[0] != q.bos_token_id
    assert g.add_bos_token and g.encode("hi")[0] == g.bos_token_id == 2
    assert q.token_to_id("<|im_end|>") in q.eos_token_ids
    assert g.eos_token_ids == {1}  # the base Gemma 3 GGUF has no chat template marking <end_of_turn>
    assert q.vocab_size == len(hq) and g.vocab_size == len(hg)
    assert q.chat_template == hq.chat_template and "<|im_start|>" in q.chat_template
    assert q.is_special(q.token_to_id("<|im_start|>")) and not q.is_special(q.encode("hi")[0])


@pytest.mark.parametrize("name", ["qwen", "gemma"])
def test_stream_decoder_never_splits_characters(name, request):
    tok, _ = request.getfixturevalue(f"{name}_pair")
    for text in (STREAM_TEXT, MIXED):
        ids = tok.encode(text, add_special_tokens=False)
        full = tok.decode(ids)
        for skip in (False, True):
            dec = StreamDecoder(tok, skip_special_tokens=skip)
            chunks = [dec.push(i) for i in ids] + [dec.flush()]
            assert "".join(chunks) == tok.decode(ids, skip_special_tokens=skip)
            assert not any("\ufffd" in c for c in chunks)
        # the test means something only if some character really spans several tokens
        pieces = [tok.decode([i]) for i in ids]
        assert any("\ufffd" in p for p in pieces) and "\ufffd" not in full


def test_stream_decoder_with_bos_and_genuinely_broken_bytes(qwen_pair, gemma_pair):
    q, _ = qwen_pair
    g, _ = gemma_pair
    # Byte-fallback tokens for a 4-byte emoji cut short: the full decode has U+FFFD, so may the chunks.
    broken = [g.token_to_id("<0xF0>"), g.token_to_id("<0x9F>")] + g.encode(" ok", add_special_tokens=False)
    for tok, ids in ((g, g.encode(STREAM_TEXT)), (g, broken)):
        dec = StreamDecoder(tok)
        out = "".join(dec.push(i) for i in ids) + dec.flush()
        assert out == tok.decode(ids)
    dec = StreamDecoder(q)
    ids = q.encode("a😀")
    first = [dec.push(i) for i in ids[:-1]]
    assert "".join(first) == "a"  # the emoji's first bytes are held back
    assert dec.push(ids[-1]) == "😀" and dec.flush() == ""
    # an answer cut mid-character (max_tokens): the final flush drops the half character, not "ok\ufffd"
    cut = g.encode("ok", add_special_tokens=False) + broken[:2]
    dec = StreamDecoder(g)
    assert "".join(dec.push(i) for i in cut) == "ok" and dec.flush().endswith("\ufffd")  # as decode() says
    dec = StreamDecoder(g)
    assert "".join(dec.push(i) for i in cut) == "ok" and dec.flush(final=True) == ""


# -- synthetic llama (SentencePiece) GGUF: the TinyLlama/Llama-2 case --------------------------------
SPM_PIECES = ["▁the", "▁a", "▁h", "el", "lo", "▁hello", "▁wor", "ld", "▁world", "▁", "he", "ll", "o", "e", "l",
              "h", "w", "r", "d", "t", "a", ",", ".", "!", "▁▁", "▁▁▁▁", "in", "▁in", "g", "ing", "▁t", "th",
              "1", "2", "3", "x", "y", "=", "▁=", "(", ")"]


def _write_gguf(path: Path, arch: str, tokens, scores, types, *, eot=None, model="llama", template=None, bos=1):
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    w.add_tokenizer_model(model)
    w.add_token_list(tokens)
    if scores is not None:
        w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(bos)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    if eot is not None:
        w.add_eot_token_id(eot)
    if template is not None:
        w.add_chat_template(template)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def spm_gguf(tmp_path_factory):
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + SPM_PIECES + ["<|eot|>", "<extra>"]
    scores = [0.0] * 259 + [-float(i) for i in range(len(SPM_PIECES))] + [0.0, 0.0]
    types = [2, 3, 3] + [6] * 256 + [1] * len(SPM_PIECES) + [3, 4]
    path = tmp_path_factory.mktemp("spm") / "tiny-llama.gguf"
    return _write_gguf(path, "llama", tokens, scores, types, eot=len(tokens) - 2)


def test_synthetic_llama_gguf_matches_transformers(spm_gguf):
    from transformers import AutoTokenizer

    mine = Tokenizer.from_gguf(spm_gguf)
    hf = AutoTokenizer.from_pretrained(str(spm_gguf.parent), gguf_file=spm_gguf.name)
    texts = ["hello world", " hello  world", "the thing in a world!", "x = (1 + 2)", "héllo 😀 wörld",
             "  leading", "trail  ", "a\nb\n\nc", "hello<s>world</s> <|eot|>x<extra>y", "", "Ünïcödé ∑"]
    for t in texts:
        for special in (True, False):
            assert mine.encode(t, add_special_tokens=special) == hf(t, add_special_tokens=special).input_ids, t
        ids = mine.encode(t)
        assert mine.decode(ids) == hf.decode(ids)
        assert mine.decode(ids, skip_special_tokens=True) == hf.decode(ids, skip_special_tokens=True)
    assert mine.encode("hello")[0] == 1  # llama vocabularies add BOS
    assert mine.eos_token_ids == {2, mine.token_to_id("<|eot|>")}  # eot_token_id from the file
    ids = mine.encode("héllo 😀 wörld", add_special_tokens=False)
    dec = StreamDecoder(mine)
    chunks = [dec.push(i) for i in ids] + [dec.flush()]
    assert "".join(chunks) == mine.decode(ids) and not any("\ufffd" in c for c in chunks)


@pytest.mark.parametrize("arch", ["phi3", "gemma3"])
def test_synthetic_sentencepiece_variants_match_transformers(arch, tmp_path):
    """Phi-3 (prefix "▁" from the normalizer) and Gemma (spaces normalized, multi-space tokens
    spelled with real spaces, merges in file order) on a tiny vocabulary."""
    from transformers import AutoTokenizer

    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + SPM_PIECES + ["<|eot|>", "  ", "   "]
    scores = [0.0] * 259 + [-float(i) for i in range(len(SPM_PIECES))] + [0.0, -50.0, -51.0]
    types = [2, 3, 3] + [6] * 256 + [1] * len(SPM_PIECES) + [3, 1, 1]
    path = _write_gguf(tmp_path / f"{arch}.gguf", arch, tokens, scores, types)
    mine = Tokenizer.from_gguf(path)
    hf = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    for t in ["hello world", " hello  world", "   the   thing", "x = (1 + 2)", "héllo 😀", "a\nb", "", "  ", "<|eot|>hi"]:
        for special in (True, False):
            assert mine.encode(t, add_special_tokens=special) == hf(t, add_special_tokens=special).input_ids, t
        ids = mine.encode(t, add_special_tokens=False)
        assert mine.decode(ids) == hf.decode(ids), t


@pytest.mark.parametrize("pre", ["qwen2", "llama-bpe", "default"])
def test_synthetic_byte_level_gguf_matches_transformers(pre, tmp_path):
    """gpt2-type vocabularies with the split regex named by tokenizer.ggml.pre (or GPT-2's own)."""
    import gguf
    from transformers import AutoTokenizer

    from pocketvlm.tokenizer import _byte_alphabet

    alphabet = [_byte_alphabet()[b] for b in range(256)]
    merges = ["Ġ t", "Ġt h", "h e", "Ġth e", "l l", "e ll", "h ell", "hell o", "Ġ w", "o r", "Ġw or", "l d",
              "Ġwor ld", "1 2", "12 3", "Ġ Ġ", "ĊĊ Ċ", "Ċ Ċ"]
    tokens = alphabet + [m.replace(" ", "") for m in merges] + ["<|endoftext|>", "<|im_end|>", "<think>"]
    path = tmp_path / f"bpe-{pre}.gguf"
    w = gguf.GGUFWriter(str(path), "qwen2")
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types([1] * (len(tokens) - 3) + [3, 3, 4])
    w.add_token_merges(merges)
    w.add_bos_token_id(len(tokens) - 3)
    w.add_eos_token_id(len(tokens) - 2)
    w.add_add_bos_token(False)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    mine = Tokenizer.from_gguf(path)
    hf = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    for t in ["hello world", "12345 1234567 hello   world\n\n\n  x", "it's THE'S we'll", "<think>the<|im_end|>",
              "héllo 😀 中文", "  ", ""]:
        for special in (True, False):
            assert mine.encode(t, add_special_tokens=special) == hf(t, add_special_tokens=special).input_ids, t
        ids = mine.encode(t)
        assert mine.decode(ids) == hf.decode(ids)
    assert not mine.add_bos_token and mine.eos_token_ids == {len(tokens) - 2}


def test_gguf_reader_object_gives_same_tokenizer(spm_gguf):
    import gguf

    a = Tokenizer.from_gguf(spm_gguf)
    b = Tokenizer.from_gguf(gguf.GGUFReader(str(spm_gguf)))
    t = "hello world 😀 <|eot|>"
    assert a.encode(t) == b.encode(t) and a.eos_token_ids == b.eos_token_ids


# -- Hugging Face folder -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    from tokenizers import Tokenizer as Backend, models, pre_tokenizers as pt, decoders, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Backend(models.BPE())
    backend.pre_tokenizer = pt.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>", "</s>", "<pad>", "<|user|>", "<|end|>"],
                                  initial_alphabet=pt.ByteLevel.alphabet())
    backend.train_from_iterator([MIXED] * 3, trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                 add_bos_token=True, additional_special_tokens=["<|user|>", "<|end|>"])
    hf.chat_template = [
        {"name": "default", "template": "{% for m in messages %}<|user|>{{ m['content'] }}<|end|>{% endfor %}"},
        {"name": "tool_use", "template": "{{ tools }}"},
    ]
    folder = tmp_path_factory.mktemp("hf_tok")
    hf.save_pretrained(folder)
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 2]}))
    return folder


def test_folder_matches_transformers(hf_folder):
    from transformers import AutoTokenizer

    mine = Tokenizer.from_folder(hf_folder)
    hf = AutoTokenizer.from_pretrained(str(hf_folder))
    for t in PIECES[:20] + ["<s>hi</s><|user|>x<|end|>"]:
        for special in (True, False):
            assert mine.encode(t, add_special_tokens=special) == hf(t, add_special_tokens=special).input_ids, t
    ids = mine.encode(MIXED)
    assert ids[0] == mine.bos_token_id == hf.bos_token_id
    assert mine.decode(ids, skip_special_tokens=True) == hf.decode(ids, skip_special_tokens=True)
    assert mine.eos_token_ids == {1, 2, mine.token_to_id("<|end|>")}  # eos + generation_config + template's <|end|>
    assert set(mine.chat_templates) >= {"default", "tool_use"}
    assert mine.chat_template == mine.chat_templates["default"]


def test_folder_chat_template_jinja_file_wins(hf_folder, tmp_path):
    import shutil

    folder = tmp_path / "copy"
    shutil.copytree(hf_folder, folder)
    (folder / "chat_template.jinja").write_text("JINJA {{ messages }}")
    assert Tokenizer.from_folder(folder).chat_template == "JINJA {{ messages }}"


def test_added_token_dict_in_config(hf_folder, tmp_path):
    import shutil

    folder = tmp_path / "copy"
    shutil.copytree(hf_folder, folder)
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    cfg["bos_token"] = {"content": "<s>", "special": True, "normalized": False, "lstrip": False, "rstrip": False,
                        "single_word": False}
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert Tokenizer.from_folder(folder).bos_token == "<s>"


# -- bad input -------------------------------------------------------------------------------------------
def test_missing_and_malformed_files(tmp_path, spm_gguf, hf_folder):
    with pytest.raises(ModelNotFoundError, match="not found"):
        Tokenizer.from_gguf(tmp_path / "nope.gguf")
    with pytest.raises(ModelNotFoundError, match="not found"):
        Tokenizer.from_folder(tmp_path / "nope")
    with pytest.raises(ModelNotFoundError, match="tokenizer.json"):
        Tokenizer.from_folder(tmp_path)
    (tmp_path / "x.gguf").write_bytes(b"NOTAGGUF" * 10)
    with pytest.raises(CorruptWeightsError, match="not a GGUF"):
        Tokenizer.from_gguf(tmp_path / "x.gguf")
    (tmp_path / "empty.gguf").write_bytes(b"")
    with pytest.raises(CorruptWeightsError):
        Tokenizer.from_gguf(tmp_path / "empty.gguf")
    data = spm_gguf.read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) // 3])
    with pytest.raises(CorruptWeightsError, match="truncated"):
        Tokenizer.from_gguf(tmp_path / "cut.gguf")
    import shutil

    bad = tmp_path / "badcfg"
    shutil.copytree(hf_folder, bad)
    (bad / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        Tokenizer.from_folder(bad)
    (bad / "tokenizer_config.json").write_text("{}")
    (bad / "tokenizer.json").write_text('{"model": 3}')
    with pytest.raises(ConfigError, match="tokenizers library"):
        Tokenizer.from_folder(bad)


def test_unsupported_or_incomplete_gguf_tokenizer(tmp_path, spm_gguf):
    p = _write_gguf(tmp_path / "bert.gguf", "bert", ["[UNK]", "[CLS]", "[SEP]", "a"], None, [2, 3, 3, 1], model="bert")
    with pytest.raises(UnsupportedArchitectureError, match="'bert'"):
        Tokenizer.from_gguf(p)
    p = _write_gguf(tmp_path / "nomerges.gguf", "qwen2", ["a", "b", "ab"], None, [1, 1, 1], model="gpt2")
    with pytest.raises(ConfigError, match="merges"):
        Tokenizer.from_gguf(p)
    p = _write_gguf(tmp_path / "noscores.gguf", "llama", ["<unk>", "<s>", "</s>", "a"], None, [2, 3, 3, 1])
    with pytest.raises(ConfigError, match="scores"):
        Tokenizer.from_gguf(p)
    with pytest.raises(TypeError):
        Tokenizer.from_gguf(spm_gguf).encode(b"bytes")  # type: ignore[arg-type]
