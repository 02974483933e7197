"""HF <-> Megatron conversion at TP=1 in this process (TP=2: tests/distributed/test_model_parallel.py).

The reshaping functions are checked against loop-built layouts; tiny random HF models (Llama and
Qwen2, tied and untied, GQA, QKV bias) round-trip bit-exactly and their Megatron logits match HF.
"""

import dataclasses

import pytest
import torch

from carft_mega.models import convert
from carft_mega.models.convert import (KEY_MAP, concat_gate_up, merge_qkv_gqa, merge_tp_shards, pad_vocab_rows,
                                       shard_for_tp, split_gate_up, split_qkv_gqa, strip_vocab_padding)
from tests.models.mcore_helpers import (CONVERSION_CASES, assert_fp32_close, model_cfg, policy_inputs, tiny_arch,
                                        tiny_hf_model, tp1)  # noqa: F401


@pytest.mark.parametrize("nh,ng,hd,cols", [(4, 2, 3, 5), (9, 3, 4, 1), (6, 6, 2, 7), (8, 1, 2, 0)])
def test_merge_qkv_gqa_layout(nh, ng, hd, cols):
    shape = lambda rows: (rows, cols) if cols else (rows,)  # noqa: E731  weight or bias
    q, k, v = (torch.randn(shape(n * hd)) for n in (nh, ng, ng))
    fused = merge_qkv_gqa(q, k, v, ng, hd)
    r = nh // ng
    expect = []  # loop-built Megatron layout: per group, its r query heads, then its k, then its v
    for g in range(ng):
        for j in range(r):
            expect.append(q[(g * r + j) * hd:(g * r + j + 1) * hd])
        expect.append(k[g * hd:(g + 1) * hd])
        expect.append(v[g * hd:(g + 1) * hd])
    assert torch.equal(fused, torch.cat(expect))
    q2, k2, v2 = split_qkv_gqa(fused, nh, ng, hd)
    assert torch.equal(q2, q) and torch.equal(k2, k) and torch.equal(v2, v)


def test_gate_up_and_vocab_padding():
    gate, up = torch.randn(6, 4), torch.randn(6, 4)
    fc1 = concat_gate_up(gate, up)
    assert torch.equal(fc1[:6], gate) and torch.equal(fc1[6:], up)
    g2, u2 = split_gate_up(fc1)
    assert torch.equal(g2, gate) and torch.equal(u2, up)
    w = torch.randn(203, 4)
    p = pad_vocab_rows(w, 256)
    assert p.shape == (256, 4) and torch.equal(p[:203], w) and not p[203:].any()
    assert torch.equal(strip_vocab_padding(p, 203), w)
    with pytest.raises(ValueError, match="does not fit"):
        pad_vocab_rows(w, 200)


@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("layout", ["column", "vocab", "qkv", "row", "fc1", "replicated"])
def test_shard_and_merge_are_inverse(layout, tp):
    full = torch.randn(16, 8)
    shards = [shard_for_tp(full, layout, r, tp) for r in range(tp)]
    assert torch.equal(merge_tp_shards(shards, layout), full)
    if layout in ("column", "vocab", "qkv"):
        assert all(torch.equal(s, full[r * 16 // tp:(r + 1) * 16 // tp]) for r, s in enumerate(shards))
    elif layout == "row":
        assert all(torch.equal(s, full[:, r * 8 // tp:(r + 1) * 8 // tp]) for r, s in enumerate(shards))
    elif layout == "fc1":  # rank r holds [gate_r; up_r]
        n = 8 // tp
        for r, s in enumerate(shards):
            assert torch.equal(s, torch.cat([full[r * n:(r + 1) * n], full[8 + r * n:8 + (r + 1) * n]]))


def test_key_map_covers_every_megatron_parameter(tp1):
    """Every GPT parameter of every supported layout has exactly one KEY_MAP entry (local spec names)."""
    from carft_mega.models.build import build_model_skeleton

    for _, kw in CONVERSION_CASES:
        arch = tiny_arch(**kw)
        pol = build_model_skeleton(arch, model_cfg(), 256)
        names = {n for _, n in convert.megatron_keys(arch)}
        assert names == set(dict(pol.gpt.named_parameters())), kw
    assert all("{}" in k or not k.startswith("decoder.layers") for k in KEY_MAP)
    assert convert.from_te_name(convert.to_te_name("decoder.layers.3.input_layernorm.weight")) == \
        "decoder.layers.3.input_layernorm.weight"


@pytest.mark.parametrize("name,kw", CONVERSION_CASES)
def test_hf_megatron_hf_bitexact_and_logits_tp1(tp1, name, kw):
    from carft_mega.models.build import policy_from_hf_source

    arch = tiny_arch(**kw)
    hf = tiny_hf_model(arch, seed=len(name))
    pol = policy_from_hf_source(convert.HFSource.from_model(hf), model_cfg())
    back = convert.megatron_to_hf_state_dict(convert.gather_gpt_state_dict(pol.gpt, arch, pol.tp_group), arch)
    ref = {k: v for k, v in hf.state_dict().items() if not (arch.tie_embeddings and k == "lm_head.weight")}
    assert set(back) == set(ref)
    for k in ref:
        assert torch.equal(back[k], ref[k]), k
    # Megatron's padding rows are zero.
    assert not pol.gpt.embedding.word_embeddings.weight[arch.vocab_size:].any()
    tokens, _, _, _ = policy_inputs(seed=3)
    with torch.no_grad():
        meg = pol.lm_logits(pol.trunk(tokens), gather=True).transpose(0, 1)
        want = hf(tokens).logits
    assert meg.shape[-1] == 256
    err = (meg[..., :arch.vocab_size] - want).abs().max().item()
    assert err <= 1e-4, f"max|dlogit| = {err:.2e}"


def test_mistral_sliding_window_matches_hf(tp1):
    """Mistral with a 4-token window (shorter than the sequence), with and without left padding."""
    from carft_mega.models.build import policy_from_hf_source
    from tests.models.mcore_helpers import hf_reference

    arch = tiny_arch("mistral", tied=False, window=4)
    hf = tiny_hf_model(arch, seed=2)
    pol = policy_from_hf_source(convert.HFSource.from_model(hf), model_cfg())
    tokens, mask, spans, _ = policy_inputs(seed=4)
    with torch.no_grad():
        for m in (None, mask):
            out = pol(tokens, attention_mask=m, span_masks=spans, need_entropy=True)
            ref = hf_reference(hf, pol.cot_head.state_dict(), tokens, m, spans)
            real = torch.ones_like(tokens, dtype=torch.bool) if m is None else m
            assert_fp32_close("logp", out.logp[real], ref["logp"][real])
            assert_fp32_close("entropy", out.entropy[real], ref["entropy"][real])
        # The window matters at this length: full causal attention gives other log-probs.
        pol.arch = dataclasses.replace(arch, sliding_window=None)
        full = pol(tokens, attention_mask=mask).logp
        assert (full - out.logp)[mask].abs().max() > 1e-3


@pytest.mark.parametrize("max_window_layers", [0, 2])  # 0: every layer windowed; 2 = num_layers: none
def test_qwen2_sliding_window_matches_hf(tp1, tmp_path, max_window_layers):
    """Qwen2 with use_sliding_window=True and a 3-token window on 13-token rows: the converted model
    windows exactly the layers HF windows, and the HF export keeps that."""
    import transformers

    from carft_mega.models.arch import arch_from_hf_config
    from carft_mega.models.build import policy_from_hf_source
    from carft_mega.models.policy import build_attention_mask, left_pad_position_ids

    base = tiny_arch("qwen2", tied=False).to_hf_config().to_dict()
    cfg = transformers.Qwen2Config.from_dict({**base, "use_sliding_window": True, "sliding_window": 3,
                                              "max_window_layers": max_window_layers, "layer_types": None})
    hf = tiny_hf_model(None, seed=6, config=cfg)
    arch = arch_from_hf_config(cfg)
    assert arch.sliding_window == (3 if max_window_layers == 0 else None)
    pol = policy_from_hf_source(convert.HFSource.from_model(hf), model_cfg())
    tokens, mask, _, _ = policy_inputs(seed=4)  # T = 13 > window; rows left-padded by 0, 1, 5, 12

    def megatron_logits(window):
        pos = left_pad_position_ids(mask)
        h = pol.trunk(tokens, position_ids=pos, attention_mask=build_attention_mask(mask, sliding_window=window))
        return pol.lm_logits(h, gather=True).transpose(0, 1)[..., :arch.vocab_size]  # (B, T, V)

    def hf_logits(model):
        pos = left_pad_position_ids(mask)
        return model(input_ids=tokens, attention_mask=mask.long(), position_ids=pos).logits

    with torch.no_grad():
        want = hf_logits(hf)
        err = (megatron_logits(arch.sliding_window) - want)[mask].abs().max().item()
        assert err <= 1e-4, f"max|dlogit| = {err:.2e}"
        other = 3 if arch.sliding_window is None else None  # the wrong reading of the config is visible
        assert (megatron_logits(other) - want)[mask].abs().max().item() > 1e-3

        # Export (Megatron -> HF directory) and reload with transformers: same attention pattern.
        back = convert.megatron_to_hf_state_dict(convert.gather_gpt_state_dict(pol.gpt, arch, pol.tp_group), arch)
        convert.save_hf_checkpoint(tmp_path, back, arch)
        reloaded = convert.load_hf_model(str(tmp_path)).eval()
        assert arch_from_hf_config(reloaded.config) == arch
        err = (hf_logits(reloaded) - want)[mask].abs().max().item()
        assert err <= 1e-6, f"exported model: max|dlogit| = {err:.2e}"


def test_v_head_names_round_trip():
    sd = {"proj.weight": torch.randn(4, 6), "proj.bias": torch.randn(4), "summary.weight": torch.randn(1, 4),
          "summary.bias": torch.randn(1)}
    hf = convert.v_head_to_hf(sd)
    assert set(hf) == {"v_head.proj.weight", "v_head.proj.bias", "v_head.summary.weight", "v_head.summary.bias"}
    back = convert.v_head_from_hf(hf)
    assert all(torch.equal(back[k], sd[k]) for k in sd)
    del hf["v_head.summary.bias"]
    with pytest.raises(KeyError, match="v_head.summary.bias"):
        convert.v_head_from_hf(hf, "x/v_head.safetensors")


def test_load_rejects_mismatched_checkpoint(tp1):
    from carft_mega.models.build import build_model_skeleton

    arch = tiny_arch("llama")
    hf = tiny_hf_model(tiny_arch("llama", ffn=64), seed=0)  # wrong intermediate size
    pol = build_model_skeleton(arch, model_cfg(), 256)
    with pytest.raises(ValueError, match="linear_fc1.weight shard has shape"):
        convert.load_hf_into_gpt(pol.gpt, convert.HFSource.from_model(hf), arch, 0, 1)
    with pytest.raises(KeyError, match="not found in the HF checkpoint"):
        convert.HFSource(hf.config, lambda n: None, set(), "some/dir").get("model.norm.weight")


def test_directory_with_one_gguf_file(smollm2_gguf, tmp_path, monkeypatch):
    """A directory holding one .gguf and no safetensors works like the .gguf file itself (weights,
    tokenizer, v_head.safetensors beside it). The dequantising load is stubbed to keep this cheap."""
    link = tmp_path / "model.gguf"
    link.symlink_to(smollm2_gguf)
    assert convert.resolve_hf_path(tmp_path) == str(link)
    opened = []
    monkeypatch.setattr(convert.HFSource, "_open_gguf", classmethod(lambda cls, p: opened.append(p) or "src"))
    assert convert.HFSource.open(tmp_path) == "src" and opened == [str(link)]
    tok = convert.load_tokenizer(tmp_path)
    assert tok is not None and len(tok) == 49152
    assert convert.read_v_head(tmp_path) is None and convert.read_v_head(link) is None
    head = {"proj.weight": torch.randn(4, 576), "proj.bias": torch.randn(4), "summary.weight": torch.randn(1, 4),
            "summary.bias": torch.randn(1)}
    from safetensors.torch import save_file

    save_file(convert.v_head_to_hf(head), str(tmp_path / convert.V_HEAD_FILE))
    for where in (tmp_path, link):  # the directory, and the .gguf file with the head beside it
        got = convert.read_v_head(where)
        assert got is not None and all(torch.equal(got[k], head[k]) for k in head)
    (tmp_path / "other.gguf").symlink_to(smollm2_gguf)  # two files: no longer a GGUF directory
    assert convert.resolve_hf_path(tmp_path) == str(tmp_path)


def test_sharded_directory_reads_only_the_indexed_files(tmp_path):
    """With model.safetensors.index.json only the listed shards are read (a stale extra file is ignored)."""
    from safetensors.torch import save_file

    hf = tiny_hf_model(tiny_arch("llama", tied=False), seed=1)
    hf.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / convert.WEIGHTS_INDEX).exists()
    save_file({"model.norm.weight": torch.zeros(64), "stray.weight": torch.zeros(2)},
              str(tmp_path / "zz-stale.safetensors"))
    src = convert.HFSource.open(tmp_path)
    sd = hf.state_dict()
    assert src.names == set(sd)
    assert all(torch.equal(src.get(k), sd[k]) for k in sd)
    index = (tmp_path / convert.WEIGHTS_INDEX).read_text()
    (tmp_path / convert.WEIGHTS_INDEX).write_text(index.replace("model-00001-of", "gone-00001-of"))
    with pytest.raises(FileNotFoundError, match="lists missing weight files"):
        convert.HFSource.open(tmp_path)
