"""Tiny random-weight chat models for the server tests: a Qwen2 decoder saved by transformers plus a small
byte-level BPE tokenizer trained here, with a ChatML chat template and ``<|im_end|>`` as EOS. Loads in well
under a second and answers deterministically at temperature 0."""
from __future__ import annotations

import json
from pathlib import Path

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}"
    "{% else %}<image>{% endif %}{% endfor %}{% endif %}{{ '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "Hello! How are you today? I am fine, thank you.",
    "What is in this picture? A cat sitting on a red chair near the window.",
    "The quick brown fox jumps over the lazy dog. Count: one two three four five six seven eight nine ten.",
    "Describe the image in detail, please. The sky is blue and the grass is green.",
    "user assistant system question answer model server token stream",
]


def write_tokenizer(d: Path, vocab_size: int = 320) -> int:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS * 20, trainer)
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
        "chat_template": CHATML, "add_bos_token": False, "model_max_length": 512,
    }))
    return tok.get_vocab_size()


def make_tiny_qwen2(d: Path, seed: int = 0, max_position_embeddings: int = 256, hidden: int = 64,
                    layers: int = 2, std: float = 0.3, never_eos: bool = False) -> Path:
    """A tiny Qwen2 chat model folder (random weights, real tokenizer, ChatML template).

    The config and safetensors are written exactly as ``Qwen2ForCausalLM.save_pretrained`` lays them out
    (same keys and shapes), without importing transformers, which alone takes 15-30 s on a busy 2-core
    machine. ``std`` is larger than HF's 0.02 init so that greedy answers vary from token to token instead
    of repeating one token, which makes "same answer alone and under load" a meaningful check.

    ``never_eos``: an untied LM head whose ``<|im_end|>`` row is zero, so that its logit sits mid-pack and a
    greedy answer runs to ``max_tokens`` (tests that need a long generation to interrupt)."""
    import torch
    from safetensors.torch import save_file

    d = Path(d)
    d.mkdir(parents=True, exist_ok=True)
    vocab = write_tokenizer(d)
    heads, kv_heads, inter = 4, 2, hidden * 2
    hd = hidden // heads
    cfg = {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": hidden,
        "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": kv_heads, "vocab_size": vocab, "max_position_embeddings": max_position_embeddings,
        "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "hidden_act": "silu", "tie_word_embeddings": not never_eos,
        "eos_token_id": 2, "bos_token_id": None, "torch_dtype": "float32", "use_sliding_window": False,
    }
    (d / "config.json").write_text(json.dumps(cfg, indent=1))
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": 2}))
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return (torch.randn(*shape, generator=g) * std).contiguous()

    emb = rnd(vocab, hidden)
    emb[len(SPECIALS):len(SPECIALS) + 256] *= 0.1  # single bytes rarely win: answers read as corpus sub-words
    w = {"model.embed_tokens.weight": emb, "model.norm.weight": torch.ones(hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        w.update({
            p + "self_attn.q_proj.weight": rnd(heads * hd, hidden), p + "self_attn.q_proj.bias": rnd(heads * hd),
            p + "self_attn.k_proj.weight": rnd(kv_heads * hd, hidden), p + "self_attn.k_proj.bias": rnd(kv_heads * hd),
            p + "self_attn.v_proj.weight": rnd(kv_heads * hd, hidden), p + "self_attn.v_proj.bias": rnd(kv_heads * hd),
            p + "self_attn.o_proj.weight": rnd(hidden, heads * hd),
            p + "mlp.gate_proj.weight": rnd(inter, hidden), p + "mlp.up_proj.weight": rnd(inter, hidden),
            p + "mlp.down_proj.weight": rnd(hidden, inter),
            p + "input_layernorm.weight": torch.ones(hidden), p + "post_attention_layernorm.weight": torch.ones(hidden),
        })
    if never_eos:
        head = emb.clone()
        head[SPECIALS.index("<|im_end|>")] = 0
        w["lm_head.weight"] = head
    save_file(w, str(d / "model.safetensors"), metadata={"format": "pt"})
    return d


def make_tiny_llava(d: Path, seed: int = 0, image_size: int = 32, patch_size: int = 8) -> Path:
    """A tiny LLaVA (CLIP vision tower + MLP projector + Qwen2 decoder) saved by transformers, with the
    tokenizer above plus an ``<image>`` special token and a CLIP preprocessor_config.json."""
    import torch
    import transformers

    d = Path(d)
    d.mkdir(parents=True, exist_ok=True)
    from tokenizers import Tokenizer

    vocab = write_tokenizer(d)
    tok = Tokenizer.from_file(str(d / "tokenizer.json"))
    tok.add_special_tokens(["<image>"])
    tok.save(str(d / "tokenizer.json"))
    image_id = tok.token_to_id("<image>")
    vocab = tok.get_vocab_size()
    torch.manual_seed(seed)
    vision = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=2, image_size=image_size, patch_size=patch_size,
                                           projection_dim=32)
    text = transformers.Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                    num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=512,
                                    tie_word_embeddings=False, eos_token_id=2)
    cfg = transformers.LlavaConfig(vision_config=vision, text_config=text, image_token_index=image_id,
                                   vision_feature_layer=-2, vision_feature_select_strategy="default",
                                   projector_hidden_act="gelu", tie_word_embeddings=False)
    cfg.initializer_range = 0.3  # varied answers rather than one repeated token (see make_tiny_qwen2)
    cfg.text_config.initializer_range = 0.3
    model = transformers.LlavaForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # single bytes rarely win: answers read as corpus sub-words
        model.lm_head.weight[len(SPECIALS):len(SPECIALS) + 256] *= 0.1
        # A random model could otherwise answer with the <image> token itself, which pocketvlm's LLaVA refuses
        # to embed as text (a trained model never writes it); a zero row keeps its logit far below the top.
        model.lm_head.weight[image_id] = 0
    model.save_pretrained(d)
    (d / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": image_size},
        "do_center_crop": True, "crop_size": {"height": image_size, "width": image_size}, "do_rescale": True,
        "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711], "do_convert_rgb": True, "resample": 3,
    }))
    return d
