"""Conversion pipelines: HF <-> Megatron checkpoints and the logit-parity check.

``tools/*.py`` are thin CLIs over these. They sit above both ``models/build.py`` (building and
saving policies) and ``models/convert.py`` (the tensor-level key maps and reshapes), which do not
import this module. Every function needs ``carft_mega.parallel.init_distributed`` first, and
every rank calls it.
"""

from __future__ import annotations

import os

import torch

from carft_mega import parallel
from carft_mega.config import ModelConfig
from carft_mega.models.arch import read_arch_json
from carft_mega.models.build import (export_hf, load_policy_checkpoint, policy_from_hf_source,
                                     save_policy_checkpoint, tokenizer_dir_of)
from carft_mega.models.convert import (HFSource, export_token_ids, load_hf_model, load_tokenizer, read_v_head,
                                       v_head_path)
from carft_mega.models.gpt import DTYPES
from carft_mega.models.policy import build_attention_mask, left_pad_position_ids, megatron_to_batch_major

DEFAULT_PROMPTS = (
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
    "How many clips did Natalia sell altogether in April and May?",
    "Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting. How much did she earn?",
    "The capital of France is",
    "def fibonacci(n):",
)


def convert_hf_to_megatron(hf_path: str | os.PathLike, out_dir: str | os.PathLike, *, dtype: str = "fp32",
                           cot_proj_dim: int = 64, seed: int = 1234) -> None:
    """HF directory or GGUF file -> Megatron dist_checkpointing directory (+ carft_arch.json, tokenizer/).

    Every rank converts its own TP shards in memory and dist_checkpointing writes them; the
    result loads at any TP (the vocabulary padding does not depend on TP). A ``v_head.safetensors``
    beside the HF weights becomes the CoT head, and its ``proj.weight`` rows set ``d`` (then
    ``cot_proj_dim`` is ignored); otherwise the head is initialised from ``seed``.
    """
    hf_path = os.fspath(hf_path)
    src = HFSource.open(hf_path)
    v_head = read_v_head(hf_path)
    if v_head is not None:
        cot_proj_dim = v_head["proj.weight"].shape[0]  # the head's own d
    model_cfg = ModelConfig(source="hf", path=hf_path, dtype=dtype, cot_proj_dim=cot_proj_dim, seed=seed)
    policy = policy_from_hf_source(src, model_cfg, v_head=v_head, v_head_source=v_head_path(hf_path))
    save_policy_checkpoint(policy, out_dir, tokenizer_src=hf_path,
                           extra={"source": hf_path, "saved_tp": parallel.tp_size(),
                                  "cot_head": "loaded" if v_head is not None else f"init(seed={seed})"})


def convert_megatron_to_hf(ckpt_dir: str | os.PathLike, out_dir: str | os.PathLike, *,
                           dtype: str | None = None) -> None:
    """Megatron checkpoint -> HF directory (config, model.safetensors, tokenizer files, v_head.safetensors).

    Loads at the current TP (any TP works; the shards are gathered) and rank 0 writes. The
    config's bos/eos/pad ids come from ``carft_arch.json`` (``hf_token_ids``), else from the
    checkpoint's tokenizer, else stay unset (see :func:`export_token_ids`).
    """
    info = read_arch_json(ckpt_dir)
    # No attention runs on export: the local spec always builds (no Transformer Engine needed).
    model_cfg = ModelConfig(source="mcore", path=os.fspath(ckpt_dir), dtype=info.get("dtype", "fp32"),
                            cot_proj_dim=info.get("cot_proj_dim", 64), kernels="ref", transformer_impl="local")
    policy = load_policy_checkpoint(ckpt_dir, model_cfg)
    tokenizer_dir = tokenizer_dir_of(ckpt_dir)
    export_hf(policy, out_dir, tokenizer_dir=tokenizer_dir, dtype=DTYPES[dtype] if dtype else None,
              config_extra=export_token_ids(info.get("hf_token_ids"), tokenizer_dir))


def _prompt_batch(prompts, tokenizer_src: str | None, vocab_size: int, seed: int = 0):
    """Left-padded ``(tokens [B, T], mask [B, T] bool)`` of the prompts (random ids without a tokenizer)."""
    tok = load_tokenizer(tokenizer_src) if tokenizer_src else None
    ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts] if tok is not None else None
    if ids is not None and min(len(x) for x in ids) == 0:
        raise ValueError(f"a prompt encodes to no tokens with the tokenizer of {tokenizer_src}")
    if ids is None:
        g = torch.Generator().manual_seed(seed)
        ids = [torch.randint(0, vocab_size, (8 + 5 * i,), generator=g).tolist() for i in range(len(prompts))]
    T = max(len(x) for x in ids)
    tokens = torch.zeros(len(ids), T, dtype=torch.long)
    mask = torch.zeros(len(ids), T, dtype=torch.bool)
    for i, x in enumerate(ids):
        tokens[i, T - len(x):] = torch.tensor(x, dtype=torch.long)
        mask[i, T - len(x):] = True
    return tokens, mask


@torch.no_grad()
def compare_logits(hf_path: str | os.PathLike, ckpt_dir: str | os.PathLike | None = None, *, policy=None,
                   hf_model=None, prompts=DEFAULT_PROMPTS, tokenizer_src: str | None = None) -> dict[str, float]:
    """Run HF and the Megatron model on a few prompts; compare next-token distributions in fp32.

    Args:
        hf_path: HF directory or GGUF file (ignored when ``hf_model`` is given, except for the tokenizer).
        ckpt_dir: Megatron checkpoint (ignored when ``policy`` is given).
        policy: an already built :class:`PolicyModel` (any TP).
        hf_model: an already loaded HF model.
        prompts: texts (random token ids when no tokenizer is found).
        tokenizer_src: tokenizer location (default: the HF path).

    Returns (identical on every rank):
        ``max_abs_dlogp`` (next-token log-probs of the prompt tokens), ``kl_mean`` / ``kl_max``
        (KL(HF || Megatron) per position, over real positions), ``max_abs_dlogit``, ``positions``.
    """
    if policy is None:
        # The local spec: the [B, 1, T, T] mask below is what it takes (TE wants a padding mask).
        policy = load_policy_checkpoint(ckpt_dir, ModelConfig(source="mcore", path=os.fspath(ckpt_dir),
                                                              dtype="fp32", kernels="ref", transformer_impl="local"))
    if hf_model is None:
        hf_model = load_hf_model(hf_path, dtype=torch.float32)
    policy = policy.eval()
    hf_model = hf_model.eval()
    device = next(policy.parameters()).device
    V = policy.vocab_size
    tokens, mask = _prompt_batch(prompts, tokenizer_src or os.fspath(hf_path), V)
    pos = left_pad_position_ids(mask)
    hidden = policy.trunk(tokens.to(device), position_ids=pos.to(device),
                          attention_mask=build_attention_mask(mask.to(device), sliding_window=policy.arch.sliding_window))
    meg = megatron_to_batch_major(policy.lm_logits(hidden, gather=True))[..., :V].float().cpu()  # (B, T, V)
    ref = hf_model(input_ids=tokens, attention_mask=mask.long(), position_ids=pos).logits[..., :V].float()
    lp_m, lp_h = torch.log_softmax(meg, -1), torch.log_softmax(ref, -1)
    real = mask.clone()
    kl = (lp_h.exp() * (lp_h - lp_m)).sum(-1)[real]  # (positions,)
    nxt = mask[:, 1:] & mask[:, :-1]
    tgt = tokens[:, 1:, None]
    dlogp = (lp_m[:, :-1].gather(-1, tgt) - lp_h[:, :-1].gather(-1, tgt)).squeeze(-1)[nxt]
    return {"max_abs_dlogp": dlogp.abs().max().item() if dlogp.numel() else 0.0,
            "kl_mean": kl.mean().item(), "kl_max": kl.max().item(),
            "max_abs_dlogit": (meg - ref).abs()[real].max().item(), "positions": int(real.sum())}


__all__ = ["DEFAULT_PROMPTS", "convert_hf_to_megatron", "convert_megatron_to_hf", "compare_logits"]
