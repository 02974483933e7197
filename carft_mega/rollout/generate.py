"""Batched KV-cache generation on the Megatron policy (sampling for rollouts, greedy for eval).

Prompts arrive left-padded (``data.collate_prompts``). Two decoding layouts:

* ``left`` (default with the local attention spec): prefill the left-padded block once with a
  causal + padding mask, then decode one token per step; each row's rotary positions start at 0
  on its first real token, so a padded row computes exactly what it would alone.
* ``aligned`` (used with Transformer Engine attention, which ignores an explicit padding mask
  under a causal mask type): prompts are left-aligned, the prefill covers the shortest prompt,
  and longer prompts are fed token by token in place of samples until they end (Megatron's own
  static-batch scheme). No attention mask is ever needed.

Both give the same tokens (tests/rollout/test_generate.py checks greedy equality). Tensor-parallel
ranks gather the vocabulary for sampling and use the same generator seed, so they pick the same
tokens. The result is converted to left-aligned rows (prompt, generation, padding): the layout of
every training forward, which then needs no attention mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from carft_mega.rollout.sampling import select_next


@dataclass
class RolloutBatch:
    """Left-aligned rows: ``tokens[b] = prompt (prompt_lens[b]) + generation (gen_lens[b]) + pad``.

    Attributes:
        tokens: ``(B, L)`` int64.
        prompt_lens: ``(B,)`` int64.
        gen_lens: ``(B,)`` int64, generated tokens including the EOS when one was emitted.
        finished: ``(B,)`` bool, True where the row ended with EOS (False: length limit).
        sample_logp: ``(B, L)`` fp32, state-aligned log-prob of each generated token under the
            unfiltered sampling-time distribution (0 elsewhere); a diagnostic, PPO recomputes it.
    """

    tokens: torch.Tensor
    prompt_lens: torch.Tensor
    gen_lens: torch.Tensor
    finished: torch.Tensor
    sample_logp: torch.Tensor

    @property
    def lengths(self) -> torch.Tensor:
        """``(B,)`` real tokens per row."""
        return self.prompt_lens + self.gen_lens

    def gen_span(self) -> torch.Tensor:
        """``(B, L)`` bool, token-aligned: the generated tokens (the rollout CoT span)."""
        pos = torch.arange(self.tokens.shape[1], device=self.tokens.device)[None]
        return (pos >= self.prompt_lens[:, None]) & (pos < self.lengths[:, None])

    def action_mask(self) -> torch.Tensor:
        """``(B, L)`` bool, state-aligned: position t is an action when token t+1 was generated."""
        span = self.gen_span()
        return torch.cat([span[:, 1:], torch.zeros_like(span[:, :1])], dim=1)

    def generations(self) -> list[list[int]]:
        """Generated token ids per row (EOS included when emitted)."""
        rows = self.tokens.tolist()
        return [r[p:p + g] for r, p, g in zip(rows, self.prompt_lens.tolist(), self.gen_lens.tolist())]


def _uses_te_attention(policy) -> bool:
    layers = policy.gpt.decoder.layers
    return len(layers) > 0 and "TE" in type(layers[0].self_attention.core_attention).__name__


@torch.no_grad()
def generate(
    policy,
    prompts: torch.Tensor,
    prompt_lens: torch.Tensor,
    *,
    max_new_tokens: int,
    eos_id: int,
    pad_id: int,
    greedy: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    layout: str = "auto",
) -> RolloutBatch:
    """Generate up to ``max_new_tokens`` per row, stopping a row at EOS.

    Args:
        policy: a ``PolicyModel`` (unwrapped from DDP), on the device of ``prompts``.
        prompts: ``(B, P)`` int64, left-padded.
        prompt_lens: ``(B,)`` int64 real prompt lengths (>= 1).
        max_new_tokens: generation limit per row.
        eos_id, pad_id: special ids.
        greedy: argmax decoding (evaluation).
        temperature, top_k, top_p: sampling parameters, all explicit.
        generator: sampling RNG (same seed on all TP ranks).
        layout: ``auto`` | ``left`` | ``aligned`` (see module docstring).

    Returns:
        :class:`RolloutBatch`.
    """
    if prompts.dim() != 2 or prompt_lens.shape != prompts.shape[:1]:
        raise ValueError(f"prompts must be (B, P) with prompt_lens (B,), got {tuple(prompts.shape)} "
                         f"and {tuple(prompt_lens.shape)}")
    if prompts.shape[0] == 0:
        empty = prompts.new_zeros((0, prompts.shape[1]))
        return RolloutBatch(empty, prompt_lens, prompt_lens.clone(), prompt_lens.bool(), empty.float())
    if int(prompt_lens.min()) < 1:
        raise ValueError("every prompt needs at least one token")
    if layout == "auto":
        layout = "aligned" if _uses_te_attention(policy) else "left"
    if layout not in ("left", "aligned"):
        raise ValueError(f"layout must be auto, left or aligned, got {layout!r}")
    was_training = policy.training
    policy.eval()
    try:
        run = _generate_left if layout == "left" else _generate_aligned
        gen, gen_logp, gen_lens = run(policy, prompts, prompt_lens, max_new_tokens, eos_id, pad_id,
                                      dict(greedy=greedy, temperature=temperature, top_k=top_k,
                                           top_p=top_p, generator=generator))
    finally:
        policy.train(was_training)
    return _to_rollout_batch(prompts, prompt_lens, gen, gen_logp, gen_lens, eos_id, pad_id)


def _next_logits(policy, hidden: torch.Tensor) -> torch.Tensor:
    """``[S, B, H]`` trunk output -> ``(B, V)`` fp32 logits of the last position (vocab gathered)."""
    logits = policy.lm_logits(hidden[-1:], gather=True)[0]  # (B, V_pad)
    return logits[:, : policy.vocab_size].float()


def _generate_left(policy, prompts, prompt_lens, max_new, eos_id, pad_id, sample_kw):
    from carft_mega.models.policy import build_attention_mask
    from megatron.core.inference.contexts import StaticInferenceContext

    B, P = prompts.shape
    device = prompts.device
    max_len = P + max_new
    window = policy.arch.sliding_window
    ctx = StaticInferenceContext(B, max_len)
    pad = P - prompt_lens  # (B,) left padding per row
    slots = torch.arange(max_len, device=device)[None]  # (1, max_len)
    rotary_pos = (slots - pad[:, None]).clamp(min=0)  # (B, max_len): positions start at 0 per row
    real = slots >= pad[:, None]  # (B, max_len): every slot after the padding holds a real token

    mask = build_attention_mask(real[:, :P], sliding_window=window)  # (B, 1, P, P)
    hidden = policy.trunk(prompts, attention_mask=mask, inference_context=ctx, rotary_position_ids=rotary_pos)
    ctx.increment_sequence_len_offset(P)
    logits = _next_logits(policy, hidden)

    gen = torch.full((B, max_new), pad_id, dtype=torch.long, device=device)
    gen_logp = torch.zeros((B, max_new), dtype=torch.float32, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    gen_lens = torch.zeros(B, dtype=torch.long, device=device)
    for step in range(max_new):
        tok, lp = select_next(logits, **sample_kw)
        gen[:, step] = torch.where(done, pad_id, tok)
        gen_logp[:, step] = torch.where(done, 0.0, lp)
        gen_lens += (~done).long()
        done |= tok == eos_id
        if step == max_new - 1 or bool(done.all()):
            break
        cur = P + step + 1
        ctx.enable_decode_mode()
        mask = build_attention_mask(real[:, :cur], q_len=1, sliding_window=window)  # (B, 1, 1, cur)
        hidden = policy.trunk(gen[:, step:step + 1], attention_mask=mask, inference_context=ctx,
                              rotary_position_ids=rotary_pos)
        ctx.increment_sequence_len_offset(1)
        logits = _next_logits(policy, hidden)
    return gen, gen_logp, gen_lens


def _generate_aligned(policy, prompts, prompt_lens, max_new, eos_id, pad_id, sample_kw):
    from megatron.core.inference.contexts import StaticInferenceContext

    B, P = prompts.shape
    device = prompts.device
    # Left-align the prompts: row b holds its prompt at [0, len_b).
    pad = P - prompt_lens
    cols = torch.arange(P, device=device)[None]
    src = (cols + pad[:, None]).clamp(max=P - 1)
    aligned = torch.where(cols < prompt_lens[:, None], prompts.gather(1, src), pad_id)  # (B, P)
    max_len = P + max_new
    buf = torch.full((B, max_len), pad_id, dtype=torch.long, device=device)
    buf[:, :P] = aligned
    logp_buf = torch.zeros((B, max_len), dtype=torch.float32, device=device)
    ctx = StaticInferenceContext(B, max_len)
    start = int(prompt_lens.min())
    stop_at = prompt_lens + max_new  # (B,) exclusive end of each row's generation
    hidden = policy.trunk(buf[:, :start], inference_context=ctx)
    ctx.increment_sequence_len_offset(start)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    gen_lens = torch.zeros(B, dtype=torch.long, device=device)
    pos = start
    while True:
        logits = _next_logits(policy, hidden)
        tok, lp = select_next(logits, **sample_kw)
        in_prompt = pos < prompt_lens
        generating = ~in_prompt & ~done & (pos < stop_at)
        buf[:, pos] = torch.where(in_prompt, buf[:, pos], torch.where(generating, tok, pad_id))
        logp_buf[:, pos] = torch.where(generating, lp, 0.0)
        gen_lens += generating.long()
        done |= generating & (tok == eos_id)
        done |= pos + 1 >= stop_at
        pos += 1
        if bool(done.all()) or pos >= max_len:
            break
        ctx.enable_decode_mode()
        hidden = policy.trunk(buf[:, pos - 1:pos], inference_context=ctx)
        ctx.increment_sequence_len_offset(1)
    # Re-express as (B, max_new) generations.
    idx = (prompt_lens[:, None] + torch.arange(max_new, device=device)[None]).clamp(max=max_len - 1)
    valid = prompt_lens[:, None] + torch.arange(max_new, device=device)[None] < pos
    gen = torch.where(valid, buf.gather(1, idx), pad_id)
    gen_logp = torch.where(valid, logp_buf.gather(1, idx), 0.0)
    return gen, gen_logp, gen_lens


def _to_rollout_batch(prompts, prompt_lens, gen, gen_logp, gen_lens, eos_id, pad_id) -> RolloutBatch:
    """Left-padded prompts + ``(B, G)`` generations of ``gen_lens`` tokens -> left-aligned rows."""
    B, P = prompts.shape
    G = gen.shape[1]
    device = prompts.device
    lengths = prompt_lens + gen_lens
    L = int(lengths.max())
    cols = torch.arange(L, device=device)[None]  # (1, L)
    pad = (P - prompt_lens)[:, None]
    in_prompt = cols < prompt_lens[:, None]
    in_gen = ~in_prompt & (cols < lengths[:, None])
    p_idx = (cols + pad).clamp(max=P - 1)
    g_idx = (cols - prompt_lens[:, None]).clamp(min=0, max=G - 1)
    tokens = torch.where(in_prompt, prompts.gather(1, p_idx),
                         torch.where(in_gen, gen.gather(1, g_idx), pad_id))
    # State-aligned sampling log-probs: token t+1's log-prob sits at position t.
    s_idx = (cols + 1 - prompt_lens[:, None]).clamp(min=0, max=G - 1)
    action = (cols + 1 >= prompt_lens[:, None]) & (cols + 1 < lengths[:, None])
    sample_logp = torch.where(action, gen_logp.gather(1, s_idx), 0.0)
    last_tok = gen.gather(1, (gen_lens - 1).clamp(min=0)[:, None]).squeeze(1)
    finished = (gen_lens > 0) & (last_tok == eos_id)
    return RolloutBatch(tokens=tokens, prompt_lens=prompt_lens.clone(), gen_lens=gen_lens,
                        finished=finished, sample_logp=sample_logp)
