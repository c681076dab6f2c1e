"""Llama and Qwen2 decoders against transformers on tiny random weights (full and cached paths)."""
import pytest
import torch

from pocketvlm import loading

TOL = 1e-4


def tiny(kind, tmp_path, **kw):
    import transformers

    torch.manual_seed(0)
    cfgs = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, {}),
        "llama3-rope": (transformers.LlamaConfig, transformers.LlamaForCausalLM, dict(
            rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                          "original_max_position_embeddings": 32}, rope_theta=500000.0)),
        "llama-linear-tied": (transformers.LlamaConfig, transformers.LlamaForCausalLM,
                              dict(rope_scaling={"rope_type": "linear", "factor": 2.0}, tie_word_embeddings=True)),
        "mistral-sliding": (transformers.MistralConfig, transformers.MistralForCausalLM, dict(sliding_window=4)),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, dict(tie_word_embeddings=True)),
        "qwen2-yarn": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, dict(
            rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64})),
    }
    C, M, extra = cfgs[kind]
    cfg = C(**{**dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=320, max_position_embeddings=256), **extra, **kw})
    ref = M(cfg).eval()
    ref.save_pretrained(tmp_path)
    return ref, loading.load(tmp_path).model


KINDS = ["llama", "llama3-rope", "llama-linear-tied", "mistral-sliding", "qwen2", "qwen2-yarn"]


@pytest.mark.parametrize("kind", KINDS)
def test_full_forward_matches_transformers(kind, tmp_path):
    ref, ours = tiny(kind, tmp_path)
    ids = torch.randint(0, 320, (2, 14))
    mask = torch.ones(2, 14, dtype=torch.long)
    mask[1, 9:] = 0  # second sequence is shorter (right padding)
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask).logits
        got = ours(ids, attention_mask=mask)
    assert (want[0] - got[0]).abs().max() < TOL
    assert (want[1, :9] - got[1, :9]).abs().max() < TOL


@pytest.mark.parametrize("kind", KINDS)
def test_cached_decode_matches_full_forward(kind, tmp_path):
    ref, ours = tiny(kind, tmp_path)
    ids = torch.randint(0, 320, (1, 13))
    with torch.no_grad():
        want = ref(input_ids=ids).logits
        cache = ours.make_cache(1, 32)
        outs = [ours(ids[:, :5], input_pos=torch.arange(5), cache=cache)]
        for i in range(5, 13):
            outs.append(ours(ids[:, i:i + 1], input_pos=torch.tensor([i]), cache=cache))
    assert (torch.cat(outs, 1) - want).abs().max() < TOL


def test_chunked_prefill_with_attend_len(tmp_path):
    """The engine's eager path attends only over the filled prefix; same logits as the static full cache."""
    ref, ours = tiny("qwen2", tmp_path)
    ids = torch.randint(0, 320, (1, 11))
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
