"""pocketvlm.chat against transformers' apply_chat_template: real Qwen / Gemma 3 tokenizers, tiny HF
tokenizer folders, the named built-in templates, multimodal message normalization, bad input."""
from __future__ import annotations

import pytest

from pocketvlm.chat import (
    BUILTIN_TEMPLATES, encode_chat, get_template, normalize_messages, render_chat, resolve_template, stop_token_ids,
)
from pocketvlm.errors import ImageError, TemplateError
from pocketvlm.tokenizer import Tokenizer
from test_tokenizer import hf_gguf_tokenizer  # cached transformers reference tokenizers

SYSTEM_CHAT = [
    {"role": "system", "content": "You are a terse assistant."},
    {"role": "user", "content": "Hi there! 你好 😀"},
    {"role": "assistant", "content": "Hello. How can I help?"},
    {"role": "user", "content": "  What is 2+2?\nAnswer briefly.  "},
]
NO_SYSTEM_CHAT = SYSTEM_CHAT[1:]
SINGLE = [{"role": "user", "content": "Write <|im_start|> literally."}]
CONVERSATIONS = [SYSTEM_CHAT, NO_SYSTEM_CHAT, SINGLE]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city — «now»",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                          "required": ["city"]}}}]

# TinyLlama-1.1B-Chat-v1.0's published chat_template (tokenizer_config.json), the zephyr format.
TINYLLAMA_TEMPLATE = (
    "{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '<|user|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'system' %}\n{{ '<|system|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n{% endif %}\n"
    "{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}"
)

# LLaVA-OneVision's HF template: iterates over content parts and uses {% generation %}.
LLAVA_OV_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + ' '}}"
    "{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>' }}{% endfor %}"
    "{# Render all video then #}{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}"
    "{{ '<video>' }}{% endfor %}"
    "{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ '\n' + content['text'] }}"
    "{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ '\n' + content['text'] }}{% endgeneration %}{% endfor %}{% endif %}"
    "{{'<|im_end|>'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Exercises the Jinja features HF templates use: loop controls, namespace, tojson options,
# trim/lstrip of block lines, extra kwargs, tools, string methods.
FEATURE_TEMPLATE = """{%- set ns = namespace(n=0, last='') -%}
{% for message in messages %}
    {% if message['role'] == 'system' %}{% continue %}{% endif %}
    {% set ns.n = ns.n + 1 %}
    {% if ns.n > 3 %}{% break %}{% endif %}
  [{{ ns.n }}:{{ message.role | upper }}] {{ message['content'] | trim }}
{% endfor %}
{% if tools %}TOOLS={{ tools | tojson(indent=2) }}{% endif %}
{{ {'a': '<b>&"ü"', 'z': 1} | tojson }} {{ {'a': 1, 'b': [1, 2]} | tojson(separators=(',', ':'), sort_keys=true) }}
{% if enable_thinking is defined and enable_thinking %}<think>{% endif %}
{{ bos_token }}|{{ eos_token }}|{{ add_generation_prompt }}|{{ strftime_now('%Y') | length }}
"""


@pytest.fixture(scope="module")
def qwen(qwen_gguf):
    return Tokenizer.from_gguf(qwen_gguf), hf_gguf_tokenizer(qwen_gguf)


@pytest.fixture(scope="module")
def gemma(gemma3_gguf):
    return Tokenizer.from_gguf(gemma3_gguf), hf_gguf_tokenizer(gemma3_gguf)


def _render(tok: Tokenizer, msgs, template, **kw):
    return render_chat(msgs, template, bos_token=tok.bos_token, eos_token=tok.eos_token, **kw)


# -- real models -------------------------------------------------------------------------------
@pytest.mark.parametrize("agp", [True, False])
def test_qwen_gguf_template_like_transformers(qwen, agp):
    tok, hf = qwen
    assert tok.chat_template and tok.chat_template == hf.chat_template
    for msgs in CONVERSATIONS:
        assert _render(tok, msgs, tok.chat_template, add_generation_prompt=agp) == hf.apply_chat_template(
            msgs, tokenize=False, add_generation_prompt=agp)
    # tools go through HF's tojson (non-ASCII kept, no HTML escaping)
    got = _render(tok, SYSTEM_CHAT, tok.chat_template, add_generation_prompt=agp, tools=TOOLS)
    assert got == hf.apply_chat_template(SYSTEM_CHAT, tools=TOOLS, tokenize=False, add_generation_prompt=agp)
    assert "«now»" in got


@pytest.mark.parametrize("agp", [True, False])
def test_gemma3_template_like_transformers(gemma, agp):
    tok, hf = gemma
    assert tok.chat_template is None  # the Gemma 3 270M base GGUF ships no template: use the built-in "gemma"
    template = get_template("gemma")
    for msgs in CONVERSATIONS:
        assert _render(tok, msgs, template, add_generation_prompt=agp) == hf.apply_chat_template(
            msgs, chat_template=template, tokenize=False, add_generation_prompt=agp)


def test_encode_chat_ids_like_transformers(qwen, gemma):
    for (tok, hf), template in ((qwen, None), (gemma, "gemma")):
        hf_template = tok.chat_template if template is None else get_template(template)
        for msgs in CONVERSATIONS:
            for agp in (True, False):
                ids = encode_chat(tok, msgs, template, add_generation_prompt=agp)
                ref = hf.apply_chat_template(msgs, chat_template=hf_template, tokenize=True,
                                             add_generation_prompt=agp, return_dict=False)
                assert ids == ref
    g, _ = gemma
    ids = encode_chat(g, SINGLE, "gemma")
    assert ids[0] == g.bos_token_id and ids[1] != g.bos_token_id  # template writes BOS; none added twice


def test_encode_chat_bos_policy(gemma):
    tok, _ = gemma
    # zephyr writes no BOS: auto adds the tokenizer's BOS (as llama.cpp), add_bos=False is HF's choice.
    auto = encode_chat(tok, SINGLE, "zephyr")
    plain = encode_chat(tok, SINGLE, "zephyr", add_bos=False)
    assert auto == [tok.bos_token_id] + plain and plain[0] != tok.bos_token_id


def test_stop_token_ids(qwen, gemma):
    q, _ = qwen
    g, _ = gemma
    assert q.token_to_id("<|im_end|>") in stop_token_ids(q, q.chat_template)
    assert stop_token_ids(g, get_template("gemma")) == {g.eos_token_id, g.token_to_id("<end_of_turn>")}
    assert stop_token_ids(g, None) == {g.eos_token_id}


# -- tiny Hugging Face tokenizer folders --------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    from tokenizers import Tokenizer as Backend, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>", "<image>", "hi", "a"])}
    backend = Backend(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    hf = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                 additional_special_tokens=["<|im_start|>", "<|im_end|>", "<image>"])
    hf.chat_template = [
        {"name": "default", "template": LLAVA_OV_TEMPLATE},
        {"name": "features", "template": FEATURE_TEMPLATE},
        {"name": "tinyllama", "template": TINYLLAMA_TEMPLATE},
    ]
    folder = tmp_path_factory.mktemp("tiny_chat")
    hf.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny(tiny_folder):
    from transformers import AutoTokenizer

    return Tokenizer.from_folder(tiny_folder), AutoTokenizer.from_pretrained(str(tiny_folder))


MM_CHAT = [
    {"role": "system", "content": [{"type": "text", "text": "Describe images."}]},
    {"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}},
        {"type": "text", "text": "What is this?"},
        {"type": "image", "image": "/tmp/dog.jpg"},
    ]},
    {"role": "assistant", "content": "A cat and a dog."},
    {"role": "user", "content": "And the colours?"},
]


@pytest.mark.parametrize("agp", [True, False])
def test_tiny_folder_templates_like_transformers(tiny, agp):
    tok, hf = tiny
    # LLaVA-OneVision's template needs HF-style parts
    msgs, images = normalize_messages(MM_CHAT, content_format="parts")
    assert images == ["https://example.com/cat.png", "/tmp/dog.jpg"]
    got = _render(tok, msgs, resolve_template(tok), add_generation_prompt=agp)
    assert got == hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=agp)
    assert got.count("<image>") == 2
    for name in ("features", "tinyllama"):
        template = resolve_template(tok, name)
        for extra in ({}, {"enable_thinking": True, "tools": TOOLS}):
            for chat in CONVERSATIONS:
                assert _render(tok, chat, template, add_generation_prompt=agp, **extra) == hf.apply_chat_template(
                    chat, chat_template=name, tokenize=False, add_generation_prompt=agp, **extra), (name, extra)


def test_feature_template_really_exercises_features(tiny):
    tok, _ = tiny
    out = _render(tok, SYSTEM_CHAT + NO_SYSTEM_CHAT, resolve_template(tok, "features"), tools=TOOLS,
                  enable_thinking=True)
    assert "[3:USER]" in out and "[4:" not in out  # continue + break + namespace
    assert '"a": "<b>&\\"ü\\""' in out and '{"a":1,"b":[1,2]}' in out  # HF tojson: no escaping, options
    assert '\n    "type": "function"' in out and "<think>" in out


# -- named built-ins: documented formats -----------------------------------------------------------
def test_chatml_builtin_is_qwen_format(qwen):
    tok, hf = qwen
    for agp in (True, False):
        # Qwen's template differs from plain ChatML only by its default system prompt.
        assert render_chat(SYSTEM_CHAT, get_template("chatml"), add_generation_prompt=agp) == hf.apply_chat_template(
            SYSTEM_CHAT, tokenize=False, add_generation_prompt=agp)
    assert render_chat(SINGLE, get_template("chatml")) == (
        "<|im_start|>user\nWrite <|im_start|> literally.<|im_end|>\n<|im_start|>assistant\n")


def test_zephyr_builtin_matches_tinyllama_template(tiny):
    _, hf = tiny
    for chat in CONVERSATIONS:
        for agp in (True, False):
            ref = hf.apply_chat_template(chat, chat_template=TINYLLAMA_TEMPLATE, tokenize=False,
                                         add_generation_prompt=agp, eos_token="</s>")
            assert render_chat(chat, get_template("zephyr"), add_generation_prompt=agp, eos_token="</s>") == ref
    assert render_chat(SINGLE, get_template("zephyr"), eos_token="</s>") == (
        "<|user|>\nWrite <|im_start|> literally.</s>\n<|assistant|>\n")


CHAT2 = [{"role": "system", "content": "S"}, {"role": "user", "content": "U1"},
         {"role": "assistant", "content": "A1"}, {"role": "user", "content": "U2"}]


@pytest.mark.parametrize("name,expected", [
    ("llama-2", "<s>[INST] <<SYS>>\nS\n<</SYS>>\n\nU1 [/INST] A1 </s><s>[INST] U2 [/INST]"),
    ("vicuna", "S USER: U1 ASSISTANT: A1</s>USER: U2 ASSISTANT:"),
    ("gemma", "<s><start_of_turn>user\nS\n\nU1<end_of_turn>\n<start_of_turn>model\nA1<end_of_turn>\n"
              "<start_of_turn>user\nU2<end_of_turn>\n<start_of_turn>model\n"),
    ("phi-3", "<|system|>\nS<|end|>\n<|user|>\nU1<|end|>\n<|assistant|>\nA1<|end|>\n<|user|>\nU2<|end|>\n"
              "<|assistant|>\n"),
    ("zephyr", "<|system|>\nS</s>\n<|user|>\nU1</s>\n<|assistant|>\nA1</s>\n<|user|>\nU2</s>\n<|assistant|>\n"),
    ("redpajama_chat", "S\n<human>: U1\n<bot>: A1\n<human>: U2\n<bot>:"),
    ("chatml", "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU1<|im_end|>\n<|im_start|>assistant\nA1<|im_end|>\n"
               "<|im_start|>user\nU2<|im_end|>\n<|im_start|>assistant\n"),
])
def test_builtin_documented_formats(name, expected):
    assert render_chat(CHAT2, get_template(name), bos_token="<s>", eos_token="</s>") == expected


def test_vicuna_default_system_and_no_generation_prompt():
    out = render_chat(CHAT2[1:3], get_template("vicuna"), add_generation_prompt=False, eos_token="</s>")
    assert out == ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
                   "helpful, detailed, and polite answers to the user's questions. USER: U1 ASSISTANT: A1</s>")


# -- multimodal normalization ------------------------------------------------------------------------
def test_normalize_messages_string_mode(qwen):
    tok, hf = qwen
    msgs, images = normalize_messages(MM_CHAT)
    assert images == ["https://example.com/cat.png", "/tmp/dog.jpg"]
    assert msgs[0]["content"] == "Describe images."
    assert msgs[1]["content"] == "<image>\nWhat is this?\n<image>"
    assert msgs[2]["content"] == "A cat and a dog." and MM_CHAT[1]["content"][0]["type"] == "image_url"  # no mutation
    # string content is what Qwen's text template expects
    assert _render(tok, msgs, tok.chat_template) == hf.apply_chat_template(msgs, tokenize=False,
                                                                          add_generation_prompt=True)
    msgs, _ = normalize_messages(MM_CHAT, image_placeholder="<|image_pad|>", part_separator="")
    assert msgs[1]["content"] == "<|image_pad|>What is this?<|image_pad|>"


def test_normalize_messages_parts_mode_and_objects():
    from PIL import Image

    img = Image.new("RGB", (2, 2))
    chat = [{"role": "user", "content": [{"type": "image", "image": img}, "plain str part",
                                         {"type": "input_image", "image_url": "data:image/png;base64,AAAA"}]},
            {"role": "assistant", "content": "ok"}]
    msgs, images = normalize_messages(chat, content_format="parts")
    assert images == [img, "data:image/png;base64,AAAA"]
    assert msgs[0]["content"] == [{"type": "image"}, {"type": "text", "text": "plain str part"}, {"type": "image"}]
    assert msgs[1]["content"] == [{"type": "text", "text": "ok"}]
    # an image object left inside a message reaches the template only as an inert string
    out = render_chat(chat, "{{ messages[0]['content'][0]['image'] }}")
    assert out == "<Image>"


# -- bad input --------------------------------------------------------------------------------------
def test_unknown_template_name_lists_known_names(qwen):
    with pytest.raises(TemplateError) as e:
        get_template("chatml2")
    for name in BUILTIN_TEMPLATES:
        assert name in str(e.value)
    with pytest.raises(TemplateError, match="known"):
        encode_chat(qwen[0], SINGLE, "no-such-template")


def test_raise_exception_becomes_template_error():
    with pytest.raises(TemplateError, match="Conversation roles must alternate"):
        render_chat([{"role": "assistant", "content": "x"}], get_template("gemma"))
    with pytest.raises(TemplateError, match="custom failure 42"):
        render_chat(SINGLE, "{{ raise_exception('custom failure ' ~ 42) }}")


def test_bad_messages_and_templates(gemma):
    with pytest.raises(TemplateError, match="message 1 has no 'role'"):
        render_chat([{"role": "user", "content": "a"}, {"content": "b"}], get_template("chatml"))
    with pytest.raises(TemplateError, match="must be a dict"):
        render_chat(["hello"], get_template("chatml"))
    with pytest.raises(TemplateError, match="list"):
        render_chat("hello", get_template("chatml"))
    with pytest.raises(TemplateError, match="syntax error"):
        render_chat(SINGLE, "{% for m in messages %}")
    with pytest.raises(TemplateError, match="no chat template"):
        render_chat(SINGLE, "")
    with pytest.raises(TemplateError, match="underscore"):
        render_chat(SINGLE, "{% set ns = namespace(_x=1) %}")
    with pytest.raises(TemplateError):  # sandbox: no access to Python internals
        render_chat(SINGLE, "{{ messages.__class__.__mro__ }}{{ ''.__class__.__subclasses__() }}")
    with pytest.raises(TemplateError, match="ships no chat template"):
        resolve_template(gemma[0])
    with pytest.raises(TemplateError, match="unsupported content part type 'audio'"):
        normalize_messages([{"role": "user", "content": [{"type": "audio", "audio": "x.wav"}]}])
    with pytest.raises(TemplateError, match="'text'"):
        normalize_messages([{"role": "user", "content": [{"type": "text"}]}])
    with pytest.raises(ImageError, match="without an image"):
        normalize_messages([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}])
    with pytest.raises(TemplateError, match="content_format"):
        normalize_messages(SINGLE, content_format="html")
    with pytest.raises(TemplateError, match="content must be"):
        normalize_messages([{"role": "user", "content": 5}])
