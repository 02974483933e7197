"""Stage 2: CARFT PPO (paper Sec. 3-4; DESIGN.md Sec. 3-6); ReFT with ``contrastive.signal=none``;
Dr.GRPO with ``ppo.estimator=drgrpo``.

One rollout step is two functions:

* :func:`make_experience`: sample G CoTs per prompt, score them, build the CoT spans and their
  LCS once, run the no-grad forwards (rollout rows, annotated rows, reference model) at the
  sampling temperature, and compute the advantages; it returns an :class:`Experience`;
* :func:`update`: U PPO epochs over it, one optimizer step each, of the loss terms built once
  from the config by :func:`build_terms` (policy, value, KL, positive, negative). Each term
  declares the rollout spans it pools and returns its share of the global loss. Before every
  epoch after the first the rollout-side embeddings of the contrastive banks are recomputed
  without gradient, so every epoch's InfoNCE is the exact full-batch loss at the current weights.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from carft_mega import parallel
from carft_mega.algos.advantage import group_relative_advantages
from carft_mega.algos.contrastive import (InfoNCEBank, build_bank, contrastive_negative, contrastive_positive,
                                          partial_reward_embedding)
from carft_mega.algos.ppo import kl_loss, ppo_policy_loss, ppo_value_loss
from carft_mega.config import to_dict
from carft_mega.data.collate import (collate_prompts, collate_sft, encode_prompt, encode_sft, micro_batches,
                                    padding_share)
from carft_mega.ops.advantages import advantages as fused_advantages
from carft_mega.ops.advantages import global_moments, whiten_from_moments
from carft_mega.ops.lcs import span_lcs_masks
from carft_mega.reward.score import is_correct, score_batch
from carft_mega.rollout.generate import RolloutBatch, generate
from carft_mega.rollout.sampling import RowNoise, mix_seed
from carft_mega.trainer.checkpoint import CheckpointRef
from carft_mega.trainer.context import Run, TrainingStopped, build_initial_policy, rl_total_steps
from carft_mega.trainer.engine import Engine, build_engine, finish_stage, load_engine, save_engine
from carft_mega.trainer.evaluate import decode_generations, evaluate, extract_answers_tp
from carft_mega.trainer.metrics import StageTimer
from carft_mega.trainer.stop import RunStopped

RL_DATA_SALT = 1


@dataclass
class Pooled:
    """CoT embeddings of one span kind, one per row, with their validity (an empty span has none).

    Attributes:
        z: ``(n, d)`` fp32 pooled embeddings (0 where invalid).
        valid: ``(n,)`` bool.
    """

    z: torch.Tensor
    valid: torch.Tensor


@dataclass
class Spans:
    """Named token-aligned span masks of n rows: ``masks[k]`` is the span ``names[k]``.

    Names: ``full`` (the whole CoT span), ``lcs`` (its tokens in the LCS with the other side),
    ``exc`` (the rest of the span).
    """

    names: tuple[str, ...]
    masks: torch.Tensor  # (K, n, L) bool

    def pooled(self, z: torch.Tensor, valid: torch.Tensor) -> dict[str, Pooled]:
        """Name the rows of a forward's ``z (K, n, d)`` and ``valid (K, n)``."""
        return {name: Pooled(z[k], valid[k]) for k, name in enumerate(self.names)}


@dataclass
class Experience:
    """One rollout batch (local rows, left-aligned), computed once and reused by every PPO epoch.

    Attributes:
        tokens: ``(n, L)`` rollout rows (prompt, generation, padding); n = local prompts x G.
        lengths: ``(n,)`` real tokens per row, on the host (slice widths need no device sync).
        action_mask: ``(n, L)`` bool, state-aligned.
        prompt_ids: ``(n,)`` int64 global prompt index of each row (G rows per prompt).
        spans: rollout spans the loss terms pool in training forwards (None: no term pools).
        logp_old, logp_ref: ``(n, L)`` fp32 at the sampling temperature.
        values_old, returns: ``(n, L)`` fp32 (None without a critic).
        advantages: ``(n, L)`` fp32.
        zr: rollout-side embeddings by span name (detached; refreshed before each later epoch).
        za: annotated-side embeddings by span name (rollout-time policy, fixed; DESIGN.md Sec. 3).
        scores: ``(n,)`` fp32 terminal scores; correct: ``(n,)`` bool.
        offset: global index of local row 0 (rows are rank-major in the global batch).
        n_tokens, n_seqs: global action-token and sequence counts (loss normalisers).
        metrics: rollout-side metrics (global).
    """

    tokens: torch.Tensor
    lengths: torch.Tensor
    action_mask: torch.Tensor
    prompt_ids: torch.Tensor
    spans: Spans | None
    logp_old: torch.Tensor
    logp_ref: torch.Tensor
    values_old: torch.Tensor | None
    returns: torch.Tensor | None
    advantages: torch.Tensor
    zr: dict[str, Pooled]
    za: dict[str, Pooled]
    scores: torch.Tensor
    correct: torch.Tensor
    offset: int
    n_tokens: torch.Tensor
    n_seqs: torch.Tensor
    metrics: dict[str, float] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# The step


def carft_step(run: Run, engine: Engine, ref_model, step: int, terms: list | None = None) -> dict[str, float]:
    """One rollout batch and its U PPO epochs; returns metrics (global over DP)."""
    terms = build_terms(run.cfg) if terms is None else terms
    timer = StageTimer()
    exp = make_experience(run, engine.policy, ref_model, step, terms, timer)
    epochs = update(run, engine, exp, terms, step, timer)
    metrics = dict(exp.metrics)
    for k in epochs[0]:
        metrics[k] = sum(e[k] for e in epochs) / len(epochs)
    metrics.update(timer.metrics())
    metrics.update(throughput(run, engine.policy, exp, timer))
    return metrics


def make_experience(run: Run, policy, ref_model, step: int, terms: list, timer: StageTimer) -> Experience:
    """Rollout, scores, spans and LCS, the no-grad forwards and the advantages of one step."""
    cfg, G = run.cfg, run.cfg.rollout.samples_per_prompt
    idx = run.local_indices(step, cfg.ppo.rollout_batch_size, RL_DATA_SALT, drop_last=True)
    records = [run.train[i] for i in idx for _ in range(G)]  # G consecutive rows per prompt
    first_prompt = parallel.dp_rank() * len(idx)
    prompt_ids = torch.arange(first_prompt, first_prompt + len(idx)).repeat_interleave(G).to(run.device)
    with timer("rollout"):
        roll = sample_rollouts(run, policy, records, step, first_prompt * G)
    with timer("score"):
        preds = score_rollouts(run, records, roll)
        correct = torch.tensor([is_correct(p, r.answer, cfg.reward.tolerance) for p, r in zip(preds, records)],
                               device=run.device)
    need = spans_needed(cfg, terms)
    with timer("lcs"):  # once per rollout batch, never per PPO epoch
        ann, spans_r, spans_a = cot_spans(run, records, roll, need)
    T, mb = cfg.rollout.temperature, cfg.ppo.micro_batch_size
    lengths = roll.lengths.cpu()  # one transfer; every later slice width is read on the host
    with timer("old_forward"):
        old = forward_batched(policy, roll.tokens, lengths, spans_r, mb, temperature=T)
    a_rows = slice(0, None, G)
    if spans_a is not None:  # ReFT / Dr.GRPO without the embedding reward pool nothing from them
        with timer("annotated_forward"):
            # Annotated rows: one forward per prompt; its G rows' spans become K * G masks of that row.
            a_spans = Spans(spans_a.names, _per_prompt(spans_a.masks, G))
            ann_out = forward_batched(policy, ann["tokens"][a_rows], ann["lengths"][a_rows].cpu(), a_spans, mb,
                                      need_logp=False)
    with timer("ref_forward"):
        logp_ref = forward_batched(ref_model, roll.tokens, lengths, None, mb, temperature=T).logp
    zr = spans_r.pooled(old.z, old.z_valid) if spans_r is not None else {}
    za = spans_a.pooled(*_per_row(ann_out.z, ann_out.z_valid, G)) if spans_a is not None else {}
    partial_value = None
    if cfg.reward.partial == "embedding":
        # Empty annotated span (never for real data): fall back to ReFT's flat 0.1.
        ok = za["full"].valid & zr["full"].valid
        partial_value = torch.where(ok, partial_reward_embedding(za["full"].z, zr["full"].z), 0.1)
    scores = score_batch(preds, [r.answer for r in records], partial=cfg.reward.partial,
                         partial_value=partial_value, tol=cfg.reward.tolerance).to(run.device)
    action_mask = roll.action_mask()
    with timer("advantages"):
        adv, ret = compute_advantages(run, scores, old.logp, logp_ref, old.values, action_mask)
    counts = torch.tensor([float(roll.gen_lens.sum()), float(len(records))], device=run.device)
    dist.all_reduce(counts, group=parallel.dp_group())
    critic = cfg.ppo.estimator == "gae"
    exp = Experience(tokens=roll.tokens, lengths=lengths, action_mask=action_mask,
                     prompt_ids=prompt_ids, spans=_training_spans(spans_r, terms), logp_old=old.logp,
                     logp_ref=logp_ref, values_old=old.values if critic else None, returns=ret if critic else None,
                     advantages=adv, zr=zr, za=za, scores=scores, correct=correct, offset=first_prompt * G,
                     n_tokens=counts[0].clamp(min=1), n_seqs=counts[1].clamp(min=1))
    exp.metrics = rollout_metrics(run, roll, scores, correct, preds, old.logp, logp_ref, action_mask)
    exp.metrics["perf/pad_frac_forward"] = padding_share(lengths, mb)  # old, ref and update forwards
    if spans_a is not None:
        exp.metrics["perf/pad_frac_annotated"] = padding_share(ann["lengths"][a_rows], mb)
    return exp


def update(run: Run, engine: Engine, exp: Experience, terms: list, step: int,
           timer: StageTimer | None = None) -> list[dict[str, float]]:
    """U PPO epochs over ``exp``, one optimizer step each; returns each epoch's metrics (global)."""
    cfg = run.cfg
    timer = StageTimer() if timer is None else timer
    warm = step < cfg.ppo.critic_warmup_steps  # the critic learns first; the policy stays put
    epochs = []
    for epoch in range(cfg.ppo.ppo_epochs):
        if epoch > 0 and any(t.pooled_spans for t in terms):
            with timer("bank_refresh"):
                refresh_rollout_embeddings(engine.policy, exp, cfg.ppo.micro_batch_size)
        with timer("update"):
            epochs.append(_epoch(run, engine, exp, terms, warm))
    return epochs


def _epoch(run: Run, engine: Engine, exp: Experience, terms: list, warm: bool) -> dict[str, float]:
    """One pass over the rows in length-grouped micro-batches, then one optimizer step."""
    cfg = run.cfg
    for t in terms:
        t.prepare(exp)
    engine.zero_grad()
    finite = torch.ones((), dtype=torch.bool, device=run.device)
    sums: dict[str, torch.Tensor] = {}
    for rows in micro_batches(exp.lengths, cfg.ppo.micro_batch_size):
        cols = slice(0, int(exp.lengths[rows].max()))  # host tensor: no device sync
        idx = rows.to(run.device)
        out = engine.ddp(exp.tokens[idx, cols], temperature=cfg.rollout.temperature,
                         span_masks=None if exp.spans is None else exp.spans.masks[:, idx, cols])
        loss = torch.zeros((), device=run.device)
        for t in terms:
            value, metrics = t(out, exp, idx, cols)
            coef = t.coef if (t.name == "value" or not warm) else 0.0
            loss = loss + coef * value
            if t.contrastive_share:  # contrastive/loss: the term that contrastive.coef weighs
                metrics = {**metrics, "contrastive/loss": t.contrastive_share * value.detach()}
            for k, v in metrics.items():  # every metric is a share of a global value
                sums[k] = sums.get(k, 0.0) + torch.as_tensor(v, device=run.device).double()
        sums["loss"] = sums.get("loss", 0.0) + loss.detach().double()
        finite &= torch.isfinite(loss)
        engine.backward(loss)
    keys = sorted(sums)
    totals = torch.stack([sums[k] for k in keys])
    dist.all_reduce(totals, group=parallel.dp_group())  # one transfer per epoch
    metrics = dict(zip(keys, totals.tolist()))
    metrics.update(engine.optimizer_step(finite))
    return metrics


# --------------------------------------------------------------------------------------------
# Loss terms


class LossTerm:
    """One term of the PPO loss. ``pooled_spans``: the rollout spans its training forward pools;
    ``contrastive_share``: its weight inside the contrastive loss (0 for the PPO terms)."""

    name = ""
    pooled_spans: tuple[str, ...] = ()
    contrastive_share = 0.0

    def __init__(self, coef: float):
        self.coef = coef

    def prepare(self, exp: Experience) -> None:
        """Called before every PPO epoch (the contrastive terms gather their banks here)."""

    def __call__(self, out, exp: Experience, idx: torch.Tensor, cols: slice):
        """This micro-batch's share of the term (unweighted) and its metrics (shares)."""
        raise NotImplementedError


class _TokenTerm(LossTerm):
    def __init__(self, coef: float, ppo_cfg, budget: int):
        super().__init__(coef)
        self.agg, self.budget = ppo_cfg.resolved_loss_agg(), budget

    def agg_kw(self, exp: Experience) -> dict:
        return dict(agg=self.agg, num_tokens=exp.n_tokens, num_seqs=exp.n_seqs, token_budget=self.budget)


class PolicyTerm(_TokenTerm):
    name = "policy"

    def __init__(self, ppo_cfg, budget: int):
        super().__init__(1.0, ppo_cfg, budget)
        self.clip = ppo_cfg.clip_eps

    def __call__(self, out, exp, idx, cols):
        return ppo_policy_loss(out.logp, exp.logp_old[idx, cols], exp.advantages[idx, cols],
                               exp.action_mask[idx, cols], self.clip, **self.agg_kw(exp))


class ValueTerm(_TokenTerm):
    name = "value"

    def __init__(self, ppo_cfg, budget: int):
        super().__init__(ppo_cfg.vf_coef, ppo_cfg, budget)
        self.clip = ppo_cfg.value_clip

    def __call__(self, out, exp, idx, cols):
        return ppo_value_loss(out.values, exp.values_old[idx, cols], exp.returns[idx, cols],
                              exp.action_mask[idx, cols], self.clip, **self.agg_kw(exp))


class KLTerm(_TokenTerm):
    """Dr.GRPO's KL to the reference as a loss (k3), weighted by ``ppo.kl_coef``."""

    name = "kl"

    def __init__(self, ppo_cfg, budget: int):
        super().__init__(ppo_cfg.kl_coef, ppo_cfg, budget)

    def __call__(self, out, exp, idx, cols):
        return kl_loss(out.logp, exp.logp_ref[idx, cols], exp.action_mask[idx, cols], **self.agg_kw(exp))


class PositiveTerm(LossTerm):
    """Eq. 7 over correct rollouts: anchor za_full, positive zr_full, candidates every zr_full."""

    name = "positive"
    pooled_spans = ("full",)

    def __init__(self, coef: float, tau: float, clamp: float | None, share: float = 1.0):
        super().__init__(coef * share)
        self.tau, self.clamp, self.contrastive_share = tau, clamp, share
        self.bank: InfoNCEBank | None = None

    def prepare(self, exp):
        za, zr = exp.za["full"], exp.zr["full"]
        select = exp.correct & za.valid & zr.valid  # M1
        self.bank, _ = build_bank(za.z, zr.z, zr.z, select, zr.valid, parallel.dp_group(), exp.prompt_ids)

    def __call__(self, out, exp, idx, cols):
        z = exp.spans.pooled(out.z, out.z_valid)
        at = exp.offset + idx
        return contrastive_positive(exp.za["full"].z[idx], z["full"].z, self.bank.select[at],
                                    self.bank.cand_valid[at], tau=self.tau, bank=self.bank, local_index=at,
                                    clamp_pos_cos=self.clamp)


class NegativeTerm(LossTerm):
    """Eq. 8 over wrong rollouts: anchor zr_lcs, positive za_exc, candidates every zr_exc."""

    name = "negative"
    pooled_spans = ("lcs", "exc")

    def __init__(self, coef: float, tau: float, share: float = 1.0):
        super().__init__(coef * share)
        self.tau, self.contrastive_share = tau, share
        self.bank: InfoNCEBank | None = None

    def prepare(self, exp):
        lcs, exc, za_exc = exp.zr["lcs"], exp.zr["exc"], exp.za["exc"]
        select = ~exp.correct & lcs.valid & za_exc.valid  # M2
        self.bank, _ = build_bank(lcs.z, za_exc.z, exc.z, select, exc.valid, parallel.dp_group(), exp.prompt_ids)

    def __call__(self, out, exp, idx, cols):
        z = exp.spans.pooled(out.z, out.z_valid)
        at = exp.offset + idx
        return contrastive_negative(z["lcs"].z, exp.za["exc"].z[idx], z["exc"].z, self.bank.select[at],
                                    self.bank.cand_valid[at], tau=self.tau, bank=self.bank, local_index=at)


def build_terms(cfg) -> list[LossTerm]:
    """The loss terms of ``cfg``: policy; value (gae) or KL (drgrpo, when kl_coef > 0); the
    contrastive signal(s), each weighted ``c`` (``both``: ``c / 2`` each, i.e. ``c (L1 + L2) / 2``)."""
    p, c = cfg.ppo, cfg.contrastive
    budget = cfg.rollout.max_new_tokens
    terms: list[LossTerm] = [PolicyTerm(p, budget)]
    if p.estimator == "gae":
        terms.append(ValueTerm(p, budget))
    elif p.kl_coef > 0:
        terms.append(KLTerm(p, budget))
    share = 0.5 if c.signal == "both" else 1.0
    if c.signal in ("positive", "both"):
        terms.append(PositiveTerm(c.coef, c.tau, c.clamp_positive_cos, share))
    if c.signal in ("negative", "both"):
        terms.append(NegativeTerm(c.coef, c.tau, share))
    return terms


# --------------------------------------------------------------------------------------------
# Rollout, scoring, spans


def sample_rollouts(run: Run, policy, records, step: int, first_row: int) -> RolloutBatch:
    """Sample one CoT per row (``rollout.*`` pinned explicitly); left-padded prompts in.

    Row noise is keyed by (seed, step, global row id), so the samples do not depend on the
    data-parallel size or the batch layout (``rollout.sampling.RowNoise``).
    """
    cfg = run.cfg
    prompts = collate_prompts([encode_prompt(r, run.tokenizer, cfg.data.max_prompt_tokens) for r in records],
                              run.tokenizer.pad_id)
    noise = RowNoise(mix_seed(cfg.seed, RL_DATA_SALT, step), torch.arange(first_row, first_row + len(records)),
                     run.device)
    return generate(policy, prompts["tokens"].to(run.device), prompts["lengths"].to(run.device),
                    max_new_tokens=cfg.rollout.max_new_tokens, eos_id=run.tokenizer.eos_id,
                    pad_id=run.tokenizer.pad_id, greedy=False, temperature=cfg.rollout.temperature,
                    top_k=cfg.rollout.top_k, top_p=cfg.rollout.top_p, generator=noise)


def score_rollouts(run: Run, records, roll: RolloutBatch) -> list[float | None]:
    """Extracted answers (python style: run in the sandbox)."""
    _, to_extract = decode_generations(run, records, roll.generations())
    return extract_answers_tp(run, to_extract)


def spans_needed(cfg, terms: list[LossTerm]) -> set[str]:
    """Rollout span kinds the step computes: those the terms pool, plus ``full`` for the
    embedding partial reward."""
    need = {s for t in terms for s in t.pooled_spans}
    if cfg.reward.partial == "embedding":
        need.add("full")
    return need


def cot_spans(run: Run, records, roll: RolloutBatch, need: set[str]):
    """Annotated rows and the span masks of both sides (DESIGN.md Sec. 3-4).

    Returns:
        ann: collated annotated rows (``tokens``, ``target_mask``, ``lengths``) on the device (None
            when ``need`` is empty, as are both spans).
        spans_r: rollout spans (``full`` and/or ``lcs``, ``exc``), or None.
        spans_a: annotated spans (``full`` and/or ``exc``), or None.
    """
    cfg = run.cfg
    if not need:  # ReFT / Dr.GRPO without the embedding reward: no annotated rows at all
        return None, None, None
    ann = collate_sft([encode_sft(r, run.tokenizer, cfg.data.max_prompt_tokens, cfg.data.max_length)
                       for r in records], run.tokenizer.pad_id)
    ann = {k: v.to(run.device) for k, v in ann.items()}
    gen_span, target = roll.gen_span(), ann["target_mask"]
    if cfg.data.style == "python":
        target = target & ~_header_mask(run, records, ann)
    r_names, r_masks, a_names, a_masks = [], [], [], []
    if "full" in need:
        r_names.append("full"), r_masks.append(gen_span)
        a_names.append("full"), a_masks.append(target)
    if need & {"lcs", "exc"}:
        lcs_a, lcs_r = span_lcs_masks(ann["tokens"], target, roll.tokens, gen_span)
        r_names += ["lcs", "exc"]
        r_masks += [lcs_r, gen_span & ~lcs_r]
        a_names.append("exc"), a_masks.append(target & ~lcs_a)
    spans_r = Spans(tuple(r_names), torch.stack(r_masks)) if r_masks else None
    spans_a = Spans(tuple(a_names), torch.stack(a_masks)) if a_masks else None
    return ann, spans_r, spans_a


def _training_spans(spans_r: Spans | None, terms: list[LossTerm]) -> Spans | None:
    """The rollout spans the training forwards pool (a subset of what the step computed)."""
    names = [n for n in (spans_r.names if spans_r is not None else ()) if any(n in t.pooled_spans for t in terms)]
    if not names:
        return None
    return Spans(tuple(names), torch.stack([spans_r.masks[spans_r.names.index(n)] for n in names]))


def _per_prompt(masks: torch.Tensor, G: int) -> torch.Tensor:
    """``(K, n, L)`` masks of n = P * G rows -> ``(K * G, P, L)``: the G rows' masks of a prompt
    become G span masks of that prompt's one row (entry ``k * G + g`` is sample g's span k)."""
    K, n, L = masks.shape
    return masks.view(K, n // G, G, L).transpose(1, 2).reshape(K * G, n // G, L)


def _per_row(z: torch.Tensor, valid: torch.Tensor, G: int):
    """Inverse of :func:`_per_prompt` for pooled outputs: ``(K * G, P, d)`` -> ``(K, P * G, d)``."""
    KG, P, d = z.shape
    K = KG // G
    return (z.view(K, G, P, d).transpose(1, 2).reshape(K, P * G, d),
            valid.view(K, G, P).transpose(1, 2).reshape(K, P * G))


def _header_mask(run: Run, records, ann) -> torch.Tensor:
    """``(n, La)`` bool: the ``def solution():`` header (with the question as docstring) at the start
    of each python target. Rollouts get that header in their prompt, so it is no part of either CoT span."""
    from carft_mega.data.templates import build_target, python_header

    mask = torch.zeros_like(ann["target_mask"])
    for b, rec in enumerate(records):
        header, target = run.tokenizer.encode(python_header(rec.question)), run.tokenizer.encode(build_target(rec))
        n = 0  # header tokens as they appear in the tokenised target (they may merge at the boundary)
        while n < min(len(header), len(target)) and header[n] == target[n]:
            n += 1
        start = int(ann["prompt_lens"][b])
        mask[b, start:start + n] = True
    return mask


# --------------------------------------------------------------------------------------------
# Forwards and advantages


@dataclass
class _Fwd:
    logp: torch.Tensor | None
    values: torch.Tensor
    z: torch.Tensor | None
    z_valid: torch.Tensor | None


@torch.no_grad()
def forward_batched(model, tokens, lengths, spans: Spans | None, micro_batch: int, need_logp: bool = True,
                    temperature: float = 1.0) -> _Fwd:
    """No-grad forward in length-grouped micro-batches, each cut to its longest row, outputs
    scattered back to the rows' places.

    Args:
        model: a ``PolicyModel`` (policy or reference).
        tokens: ``(n, L)`` left-aligned rows; lengths: ``(n,)`` on the host.
        spans: spans to pool, or None.
        micro_batch: rows per forward.
        need_logp: compute log-probs (the annotated forward needs only values and embeddings).
        temperature: log-probs of ``softmax(logits / temperature)``.
    """
    was_training = model.training
    model.eval()
    n, L = tokens.shape
    dev = tokens.device
    logp = torch.zeros((n, L), device=dev) if need_logp else None
    values = torch.zeros((n, L), device=dev)
    z = z_valid = None
    if spans is not None:
        K, d = spans.masks.shape[0], model.cot_head.proj.out_features
        z = torch.zeros((K, n, d), device=dev)
        z_valid = torch.zeros((K, n), dtype=torch.bool, device=dev)
    for rows in micro_batches(lengths, micro_batch):
        width = int(lengths[rows].max())
        idx = rows.to(dev)
        out = model(tokens[idx, :width], span_masks=None if spans is None else spans.masks[:, idx, :width],
                    need_logp=need_logp, temperature=temperature)
        if need_logp:
            logp[idx, :width] = out.logp
        values[idx, :width] = out.values
        if spans is not None:
            z[:, idx], z_valid[:, idx] = out.z, out.z_valid
    model.train(was_training)
    return _Fwd(logp, values, z, z_valid)


def refresh_rollout_embeddings(policy, exp: Experience, micro_batch: int) -> None:
    """Recompute the rollout-side embeddings of the training spans under the current weights (no
    grad), so the contrastive banks of the next epoch hold the embeddings its micro-batches will
    compute with gradient: the InfoNCE of every epoch is the exact full-batch loss."""
    out = forward_batched(policy, exp.tokens, exp.lengths, exp.spans, micro_batch, need_logp=False)
    exp.zr.update(exp.spans.pooled(out.z, out.z_valid))


def compute_advantages(run: Run, scores, logp_old, logp_ref, values, action_mask):
    """Advantages and returns of the configured estimator.

    gae: KL-shaped rewards and GAE in the fused pass, then whitening with one all-reduce of
    moments (centred; DESIGN.md Sec. 6). drgrpo: ``r_i - mean`` over each prompt's G rows on every
    action token, no critic (returns None).
    """
    p = run.cfg.ppo
    if p.estimator == "drgrpo":
        adv = group_relative_advantages(scores, run.cfg.rollout.samples_per_prompt)  # (n,)
        out = torch.where(action_mask, adv[:, None], 0.0)
    else:
        res = fused_advantages(scores, logp_old, logp_ref, values, action_mask, p.kl_coef, p.gamma, p.lam,
                               impl=run.cfg.model.kernels)
        out, ret = res.advantages, res.returns
    how = p.resolved_whitening()
    if how != "none":
        if p.estimator == "drgrpo":
            m = action_mask
            row_sum, row_sumsq, row_count = (out * m).sum(-1), (out * out * m).sum(-1), m.sum(-1)
        else:
            row_sum, row_sumsq, row_count = res.row_sum, res.row_sumsq, res.row_count
        group = parallel.dp_group() if how == "global" else None
        moments = global_moments(row_sum, row_sumsq, row_count, group=group)
        out = whiten_from_moments(out, action_mask, *moments, add_mean_back=p.whiten_add_mean_back)
    return out, (ret if p.estimator == "gae" else None)


# --------------------------------------------------------------------------------------------
# Metrics


def _global_sum(values: list[float], device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, group=parallel.dp_group())
    return t.tolist()


def rollout_metrics(run, roll, scores, correct, preds, logp_old, logp_ref, action_mask) -> dict[str, float]:
    m = action_mask.float()
    kl = ((logp_old - logp_ref) * m).sum()
    diff = torch.where(action_mask, (roll.sample_logp - logp_old).abs(), 0.0)
    mismatch = diff.amax().reshape(1).double() if diff.numel() else torch.zeros(1, dtype=torch.float64,
                                                                                device=run.device)
    n, extracted, acc, score, gen_len, eos, kl_sum, tok = _global_sum([
        len(preds), sum(p is not None for p in preds), float(correct.sum()), float(scores.sum()),
        float(roll.gen_lens.sum()), float(roll.finished.sum()), float(kl), float(m.sum())], run.device)
    dist.all_reduce(mismatch, op=dist.ReduceOp.MAX, group=parallel.dp_group())
    return {"reward/score": score / n, "reward/accuracy": acc / n, "reward/extracted": extracted / n,
            "rollout/gen_len": gen_len / n, "rollout/eos_frac": eos / n, "rollout/kl": kl_sum / max(1.0, tok),
            "rollout/logp_mismatch_max": mismatch.item(), "rollout/tokens": gen_len, **sandbox_metrics(run)}


_SANDBOX_COUNTS = ("sandbox_error", "timeout", "crashed", "worker_died", "worker_hung", "rejected")


def sandbox_metrics(run) -> dict[str, float]:
    """Sandbox outcomes since the previous step, summed over the world (programs run on each TP
    group's first rank only, so the others add zeros). ``sandbox/sandbox_error`` counts programs
    that failed because of the sandbox, not of themselves (docs/sandbox.md): it should stay 0, and
    the first details are printed when it does not."""
    if run.cfg.data.style != "python":
        return {}
    stats = run.sandbox.stats(reset=True) if run.sandbox is not None else {k: 0 for k in _SANDBOX_COUNTS}
    if stats.get("sandbox_errors") and stats["sandbox_error_details"]:
        print(f"[rank {dist.get_rank()}] sandbox errors this step ({stats['sandbox_errors']}): "
              + "; ".join(stats["sandbox_error_details"][:3]), flush=True)
    t = torch.tensor([float(stats[k]) for k in _SANDBOX_COUNTS], dtype=torch.float64, device=run.device)
    dist.all_reduce(t)
    return {f"sandbox/{k}": v for k, v in zip(_SANDBOX_COUNTS, t.tolist())}


# bf16 dense peak FLOP/s per GPU for MFU (vendor data sheets).
_PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def throughput(run, policy, exp: Experience, timer) -> dict[str, float]:
    """Rollout tokens/s and, on a known GPU, model FLOPs utilisation (6N per trained token, 2N per
    forward or generated token; attention FLOPs ignored)."""
    t = timer.times
    gen_tokens = float(exp.n_tokens)
    out = {"perf/rollout_tokens_per_s": gen_tokens / max(t.get("rollout", 0.0), 1e-9)}
    if run.device.type == "cuda":
        name = torch.cuda.get_device_name()
        peak = next((v for k, v in _PEAK_FLOPS.items() if k in name), None)
        if peak:
            n_params = sum(p.numel() for p in policy.parameters()) * parallel.tp_size()
            rows = float(exp.lengths.sum())
            G = run.cfg.rollout.samples_per_prompt
            fwd = 2 * n_params * (rows * 2 + rows / G)  # old + ref + annotated (about a row each)
            gen = 2 * n_params * rows
            train = 6 * n_params * rows * run.cfg.ppo.ppo_epochs
            flops_per_gpu = (fwd + gen + train) / parallel.tp_size()
            out["perf/mfu"] = flops_per_gpu / (sum(t.values()) * peak)
    return out


# --------------------------------------------------------------------------------------------
# The stage


def method_name(cfg) -> str:
    if cfg.ppo.estimator == "drgrpo":
        base = f"Dr.GRPO (G={cfg.rollout.samples_per_prompt})"
        return base if cfg.contrastive.signal == "none" else f"{base} + contrastive ({cfg.contrastive.signal})"
    return "ReFT" if cfg.contrastive.signal == "none" else f"CARFT ({cfg.contrastive.signal} signal)"


def run_carft(run: Run, init: CheckpointRef | None, resume: CheckpointRef | None, plan=None) -> None:
    """Train the RL stage from ``init`` (the SFT checkpoint; None = ``model.source``), resuming
    from ``resume`` when given.

    Raises:
        RunStopped: after saving a checkpoint on a stop signal (``trainer/stop.py``).
    """
    from carft_mega.models.build import frozen_copy, load_policy_checkpoint

    cfg = run.cfg
    total = rl_total_steps(cfg, len(run.train))
    name = method_name(cfg)
    if resume is not None and resume.step >= total:  # trained: only the export / evaluation may be left
        _finish(run, resume, None, name)
        return
    policy = load_policy_checkpoint(init.path, cfg.model).to(run.device) if init is not None \
        else build_initial_policy(run)
    ref_model = frozen_copy(policy, cfg.model)  # before any update or resume: the RL start point
    U = cfg.ppo.ppo_epochs  # one optimizer step per PPO epoch
    engine = build_engine(policy, cfg.optim, peak_lr=cfg.ppo.lr, schedule=cfg.ppo.schedule,
                          warmup_ratio=cfg.ppo.warmup_ratio, total_steps=total * U,
                          distributed_optimizer=cfg.parallel.distributed_optimizer)
    if resume is not None:
        load_engine(engine, resume.path)
        state = run.ckpts.read_state(resume)
        engine.step, engine.nonfinite_streak = state["step"], state["nonfinite_streak"]
    elif not cfg.sft.enabled:
        acc0 = run.results["initial_accuracy"] = evaluate(run, engine.policy, tag="carft_step0")
        run.logger.log("carft", 0, {"eval/accuracy": acc0}, advance=False)
        run.print(f"accuracy before RL: {acc0:.4f}")
    run.print(f"{name}: {total} rollout steps of {cfg.ppo.rollout_batch_size} prompts x "
              f"{cfg.rollout.samples_per_prompt} samples, {U} PPO epochs each, lr {cfg.ppo.lr}")
    run.logger.start_stage("carft", total, engine.step // U)
    init_path = init.path if init is not None else None
    terms = build_terms(cfg)
    while engine.step < total * U:
        step = engine.step // U  # the rollout step (the data cursor)
        metrics = carft_step(run, engine, ref_model, step, terms)
        done = step + 1
        acc = None
        if cfg.logging.eval_every and done % cfg.logging.eval_every == 0 and done < total:
            acc = metrics["eval/accuracy"] = evaluate(run, engine.policy, tag=f"carft_step{done}")
        skipped = metrics.get("optim/skipped", 0.0) > 0.0
        if skipped:
            run.print(f"RL step {done}: update skipped, non-finite loss or gradient "
                      f"({engine.nonfinite_streak} in a row, the run stops at {cfg.ppo.max_nonfinite_steps})")
        run.logger.log("carft", done, metrics if skipped or done % cfg.logging.log_every == 0 or done == total else {})
        run.logger.maybe_plot(done)
        if engine.nonfinite_streak >= cfg.ppo.max_nonfinite_steps:
            raise TrainingStopped(f"RL stopped at step {done}: {engine.nonfinite_streak} consecutive updates with "
                                  f"a non-finite loss or gradient (ppo.max_nonfinite_steps)")
        signum, timed = run.stop.poll(run.device)  # one all-reduce per step: every rank stops at this step
        if plan is not None:
            plan.observe(run, "carft", done, metrics.get("time/step"))
        periodic = cfg.checkpoint.save_every and done % cfg.checkpoint.save_every == 0
        best = acc is not None and run.ckpts.would_be_best(acc)  # checkpoint.keep_best needs this step saved
        if done < total and (periodic or timed or signum or best):
            saved = save_carft(run, engine, done, init_path)
            if acc is not None:
                run.ckpts.record_eval(saved, f"carft_step{done}", acc)
            if signum:
                raise RunStopped(signum, "RL", done, total, saved.path)
    final = save_carft(run, engine, total, init_path)
    _finish(run, final, engine.policy, name)


def _finish(run: Run, final: CheckpointRef, policy, name: str) -> None:
    """Export and evaluate the final RL checkpoint (once: a resumed run reuses what was recorded)."""
    acc = finish_stage(run, "carft", final, policy, tag=f"carft_step{final.step}")
    run.results["carft_accuracy"] = acc
    run.results["final_checkpoint"] = final.path
    run.print(f"accuracy after {name}: {acc:.4f} on {len(run.test)} test problems")


def save_carft(run: Run, engine: Engine, step: int, init_path: str | None) -> CheckpointRef:
    state = {"stage": "carft", "step": engine.step, "rollout_step": step, "total_steps": engine.total_steps,
             "nonfinite_streak": engine.nonfinite_streak, "config": to_dict(run.cfg),
             # Relative to the checkpoints folder, so a run directory can be moved and still resume.
             "init_checkpoint": None if init_path is None else os.path.relpath(init_path, run.ckpts.root)}
    ref = run.ckpts.save("carft", step, lambda d: save_engine(engine, d, run.tokenizer_dir), state)
    run.stop.note_saved()
    return ref
