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
                    layers: int = 2, std: float = 0.3) -> Path:
    """A tiny Qwen2 chat model folder (random weights, real tokenizer, ChatML template).

    The config and safetensors are written exactly as ``Qwen2ForCausalLM.save_pretrained`` lays them out
    (same keys and shapes), without importing transformers, which alone takes 15-30 s on a busy 2-core
    machine. ``std`` is larger than HF's 0.02 init so that greedy answers vary from token to token instead
    of repeating one token, which makes "same answer alone and under load" a meaningful check."""
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
        "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "hidden_act": "silu", "tie_word_embeddings": True,
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
    save_file(w, str(d / "model.safetensors"), metadata={"format": "pt"})
    return d
