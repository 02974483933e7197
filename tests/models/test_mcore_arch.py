"""ArchSpec from HF configs (Llama, CodeLlama, Qwen2, Mistral), from the tiny config, vocab padding,
the checkpoint JSON and the single TransformerConfig builder."""

import json

import pytest
import torch
import transformers

from carft_mega.config import TinyModelConfig
from carft_mega.models.arch import (ArchSpec, arch_from_hf_config, arch_from_tiny, pad_vocab_size, read_arch_json,
                                    write_arch_json)
from carft_mega.models.gpt import build_transformer_config, resolve_dtype, resolve_transformer_impl


def _rope(theta):
    return {"rope_parameters": {"rope_type": "default", "rope_theta": theta}}


def test_llama_and_codellama():
    cfg = transformers.LlamaConfig(vocab_size=32016, hidden_size=256, intermediate_size=688, num_hidden_layers=3,
                                   num_attention_heads=8, num_key_value_heads=8, rms_norm_eps=1e-5,
                                   max_position_embeddings=16384, **_rope(1e6))
    a = arch_from_hf_config(cfg)
    assert (a.family, a.rope_theta, a.num_kv_heads, a.head_dim, a.qkv_bias, a.tie_embeddings) == \
        ("llama", 1e6, 8, 32, False, False)
    assert (a.vocab_size, a.ffn_hidden_size, a.num_layers, a.rms_norm_eps) == (32016, 688, 3, 1e-5)


def test_qwen2_has_qkv_bias_and_tied_embeddings():
    cfg = transformers.Qwen2Config(vocab_size=151936, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True, **_rope(1e6))
    a = arch_from_hf_config(cfg)
    assert a.family == "qwen2" and a.qkv_bias and a.tie_embeddings and a.num_kv_heads == 2
    assert a.sliding_window is None  # use_sliding_window defaults to False


def test_mistral_sliding_window_and_explicit_head_dim():
    cfg = transformers.MistralConfig(vocab_size=1000, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=1, head_dim=48, sliding_window=4096)
    a = arch_from_hf_config(cfg)
    assert a.family == "mistral" and a.sliding_window == 4096 and a.head_dim == 48 and not a.qkv_bias


@pytest.mark.parametrize("family,window", [("llama", None), ("qwen2", None), ("qwen2", 64), ("mistral", 64)])
def test_hf_config_round_trip(family, window):
    a = ArchSpec(family=family, hidden_size=96, num_layers=3, num_heads=6, num_kv_heads=2, head_dim=16,
                 ffn_hidden_size=160, vocab_size=777, max_position_embeddings=300, rope_theta=5e5, rms_norm_eps=1e-6,
                 qkv_bias=family == "qwen2", tie_embeddings=family != "llama", sliding_window=window)
    cfg = a.to_hf_config()
    assert arch_from_hf_config(cfg) == a
    if family == "qwen2":  # what HF itself will do with the exported config
        want = "sliding_attention" if window else "full_attention"
        assert cfg.layer_types == [want] * 3 and cfg.sliding_window == window


def _qwen2(n_layers=4, **kw):
    return transformers.Qwen2Config(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=n_layers,
                                    num_attention_heads=4, num_key_value_heads=2, **kw)


def test_qwen2_sliding_window_follows_hf_layer_rule():
    """HF Qwen2 windows layer i iff use_sliding_window and i >= max_window_layers (v5: layer_types)."""
    on = dict(use_sliding_window=True, sliding_window=3)
    assert arch_from_hf_config(_qwen2(**on, max_window_layers=0)).sliding_window == 3  # every layer windowed
    assert arch_from_hf_config(_qwen2(**on, max_window_layers=4)).sliding_window is None  # no layer windowed
    assert arch_from_hf_config(_qwen2(**on, max_window_layers=28)).sliding_window is None  # HF's default value
    assert arch_from_hf_config(_qwen2(sliding_window=3, max_window_layers=0)).sliding_window is None  # switched off
    with pytest.raises(ValueError, match=r"my/q: Qwen2 layer_types .*max_window_layers = 2.*layers \[2, 3\] of 4"):
        arch_from_hf_config(_qwen2(**on, max_window_layers=2), "my/q")
    explicit = _qwen2(**on, layer_types=["sliding_attention"] * 4)
    assert arch_from_hf_config(explicit).sliding_window == 3
    with pytest.raises(ValueError, match="layer_types"):
        arch_from_hf_config(_qwen2(**on, layer_types=["full_attention", "sliding_attention"] * 2))


def test_qwen2_sliding_window_without_layer_types():
    """transformers v4 configs may lack layer_types: the rule is read from max_window_layers."""
    import types

    base = _qwen2().to_dict()
    for first, want in ((0, 5), (4, None), (1, ValueError)):
        cfg = types.SimpleNamespace(**{**base, "layer_types": None, "use_sliding_window": True, "sliding_window": 5,
                                       "max_window_layers": first, "rope_theta": 1e4, "rope_parameters": None})
        if want is ValueError:
            with pytest.raises(ValueError, match="max_window_layers"):
                arch_from_hf_config(cfg)
        else:
            assert arch_from_hf_config(cfg).sliding_window == want


def test_unsupported_configs_name_the_source():
    with pytest.raises(NotImplementedError, match="my/dir: model_type 'gpt2'"):
        arch_from_hf_config(transformers.GPT2Config(), "my/dir")
    scaled = transformers.LlamaConfig(rope_parameters={"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0})
    with pytest.raises(NotImplementedError, match="RoPE scaling type 'linear' .*'rope_scaling'"):
        arch_from_hf_config(scaled)
    with pytest.raises(NotImplementedError, match="attention_bias"):
        arch_from_hf_config(transformers.LlamaConfig(attention_bias=True))
    with pytest.raises(NotImplementedError, match="hidden_act"):
        arch_from_hf_config(transformers.LlamaConfig(hidden_act="gelu"))


def test_arch_validation():
    with pytest.raises(ValueError, match="num_kv_heads = 3: must divide num_heads = 4"):
        ArchSpec(family="llama", hidden_size=64, num_layers=1, num_heads=4, num_kv_heads=3, head_dim=16,
                 ffn_hidden_size=8, vocab_size=10, max_position_embeddings=8, rope_theta=1e4, rms_norm_eps=1e-6,
                 qkv_bias=False, tie_embeddings=True)
    with pytest.raises(ValueError, match="family"):
        ArchSpec(family="gpt2", hidden_size=64, num_layers=1, num_heads=4, num_kv_heads=2, head_dim=16,
                 ffn_hidden_size=8, vocab_size=10, max_position_embeddings=8, rope_theta=1e4, rms_norm_eps=1e-6,
                 qkv_bias=False, tie_embeddings=True)


def test_arch_from_tiny():
    t = TinyModelConfig(arch="qwen2", hidden_size=48, num_heads=6, num_kv_heads=3, tie_embeddings=False,
                        rope_theta=1e6)
    a = arch_from_tiny(t, vocab_size=71)
    assert (a.family, a.head_dim, a.qkv_bias, a.vocab_size, a.tie_embeddings, a.rope_theta) == \
        ("qwen2", 8, True, 71, False, 1e6)


@pytest.mark.parametrize("vocab", [1, 127, 128, 203, 49152, 151936, 32001])
def test_pad_vocab_size_is_tp_independent_for_powers_of_two(vocab):
    sizes = {pad_vocab_size(vocab, tp) for tp in (1, 2, 4, 8)}
    assert len(sizes) == 1
    p = sizes.pop()
    assert p >= vocab and p % 128 == 0 and p - vocab < 128
    assert pad_vocab_size(vocab, 3) % 3 == 0 and pad_vocab_size(vocab, 3) % 128 == 0


def test_arch_json_round_trip_and_errors(tmp_path):
    a = arch_from_tiny(TinyModelConfig(), 99)
    write_arch_json(tmp_path, a, 128, "tokenizer", {"hf_token_ids": {"eos_token_id": 2}})
    info = read_arch_json(tmp_path)
    assert info["arch"] == a and info["padded_vocab_size"] == 128 and info["hf_token_ids"]["eos_token_id"] == 2
    with pytest.raises(FileNotFoundError, match="not a carft_mega Megatron checkpoint"):
        read_arch_json(tmp_path / "missing")
    bad = json.loads((tmp_path / "carft_arch.json").read_text())
    bad["arch"]["bogus"] = 1
    (tmp_path / "carft_arch.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="bogus"):
        read_arch_json(tmp_path)


def test_transformer_config_cpu_safe_defaults():
    a = arch_from_tiny(TinyModelConfig(arch="qwen2"), 99)
    c = build_transformer_config(a, tp=1, dtype=torch.float32)
    assert c.hidden_dropout == 0 and c.attention_dropout == 0
    assert not (c.apply_rope_fusion or c.persist_layer_norm or c.gradient_accumulation_fusion
                or c.bias_activation_fusion or c.masked_softmax_fusion)
    assert c.add_qkv_bias and not c.add_bias_linear and c.gated_linear_unit and c.normalization == "RMSNorm"
    assert c.num_query_groups == 2 and c.kv_channels == 16 and c.fp8 is None and c.recompute_granularity is None
    r = build_transformer_config(a, tp=2, sequence_parallel=True, dtype=torch.bfloat16, recompute=True)
    assert r.bf16 and r.params_dtype == torch.bfloat16 and r.sequence_parallel and r.recompute_granularity == "full"
    with pytest.raises(ValueError, match="parallel.tp' = 4: must divide the number of KV heads"):
        build_transformer_config(a, tp=4)
    with pytest.raises(ValueError, match="model.fp8"):
        build_transformer_config(a, tp=1, fp8=True, transformer_impl="local")


def test_resolvers():
    assert resolve_dtype("fp32") == torch.float32 and resolve_dtype("bf16") == torch.bfloat16
    assert resolve_dtype("auto") == (torch.bfloat16 if torch.cuda.is_available() else torch.float32)
    assert resolve_transformer_impl("local") == "local"
    import importlib.util

    have_te = importlib.util.find_spec("transformer_engine") is not None
    assert resolve_transformer_impl("auto") == ("transformer_engine" if have_te else "local")
    if not have_te:
        with pytest.raises(ValueError, match="transformer_engine is not installed"):
            resolve_transformer_impl("transformer_engine")
