"""Stage 2: CARFT PPO (paper Sec. 3-4; DESIGN.md Sec. 3-6). ``contrastive.signal=none`` is ReFT.

Per rollout step (``carft_step``): sample one CoT per prompt, score it, compute the LCS masks
once, run the no-grad forwards (rollout rows, annotated rows, reference model), shape rewards and
advantages in one fused pass, gather the contrastive banks once over data parallel, then run U
PPO epochs of ``policy + alpha * value + c * contrastive`` with one optimizer step per epoch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from carft_mega import parallel
from carft_mega.algos.contrastive import (InfoNCEBank, build_bank, contrastive_negative, contrastive_positive,
                                          partial_reward_embedding)
from carft_mega.algos.ppo import ppo_policy_loss, ppo_value_loss
from carft_mega.data.collate import collate_prompts, collate_sft, encode_prompt, encode_sft
from carft_mega.ops.advantages import advantages as fused_advantages
from carft_mega.ops.advantages import global_moments, whiten_from_moments
from carft_mega.ops.lcs import span_lcs_masks
from carft_mega.reward.score import is_correct, score_batch
from carft_mega.rollout.generate import RolloutBatch, generate
from carft_mega.trainer.checkpoint import CheckpointRef
from carft_mega.trainer.engine import Engine, build_engine, export_stage_hf, load_engine, save_engine
from carft_mega.trainer.evaluate import decode_generations, evaluate, extract_answers_tp
from carft_mega.trainer.metrics import StageTimer
from carft_mega.trainer.run import Run, TrainingStopped, build_initial_policy, rl_total_steps, step_generator

RL_DATA_SALT = 1


@dataclass
class RolloutState:
    """One rollout batch, computed once and reused by every PPO epoch (local rows, left-aligned).

    Attributes:
        tokens: ``(n, L)`` rollout rows (prompt, generation, padding).
        lengths: ``(n,)`` real tokens per row, on the host (slicing and weights need no device sync).
        actions: ``(n,)`` action tokens per row, on the host.
        action_mask: ``(n, L)`` bool, state-aligned.
        spans: ``(K, n, L)`` bool rollout spans pooled in training forwards (``span_names``), or None.
        span_names: names of ``spans`` rows among ``full``, ``lcs``, ``exc``.
        logp_old, values_old, advantages, returns: ``(n, L)`` fp32.
        za: annotated-CoT embeddings ``(n, d)`` by span name (no grad).
        banks: detached global contrastive banks by signal (``pos``, ``neg``).
        offset: global index of local row 0 in the banks.
        n_tokens, n_seqs: global action-token and sequence counts (loss normalisers).
    """

    tokens: torch.Tensor
    lengths: torch.Tensor
    actions: torch.Tensor
    action_mask: torch.Tensor
    spans: torch.Tensor | None
    span_names: list[str]
    logp_old: torch.Tensor
    values_old: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor
    za: dict[str, torch.Tensor]
    banks: dict[str, InfoNCEBank]
    offset: int
    n_tokens: torch.Tensor
    n_seqs: torch.Tensor


# --------------------------------------------------------------------------------------------
# The step


def carft_step(run: Run, engine: Engine, ref_model, step: int) -> dict[str, float]:
    """One rollout batch and its U PPO epochs; returns metrics (global over DP)."""
    cfg, timer = run.cfg, StageTimer()
    records = [run.train[i] for i in run.local_indices(step, cfg.ppo.rollout_batch_size, RL_DATA_SALT, drop_last=True)]
    with timer("rollout"):
        roll = sample_rollouts(run, engine.policy, records, step)  # (n, L) left-aligned rows
    with timer("score"):
        preds = score_rollouts(run, records, roll)
        golds = [r.answer for r in records]
        correct = torch.tensor([is_correct(p, g, cfg.reward.tolerance) for p, g in zip(preds, golds)],
                               device=run.device)
    with timer("lcs"):  # once per rollout batch, not per PPO epoch
        ann, spans_r, spans_a, names_r, names_a = cot_spans(run, records, roll)
    mb = cfg.ppo.micro_batch_size
    with timer("old_forward"):
        lengths = roll.lengths.cpu()  # one transfer; every later slice width is read on the host
        old = forward_batched(engine.policy, roll.tokens, lengths, spans_r, mb)
        ann_out = forward_batched(engine.policy, ann["tokens"], ann["lengths"].cpu(), spans_a, mb, need_logp=False)
    with timer("ref_forward"):
        logp_ref = forward_batched(ref_model, roll.tokens, lengths, None, mb).logp
    zr = dict(zip(names_r, old.z)) if old.z is not None else {}
    zr_ok = dict(zip(names_r, old.z_valid)) if old.z is not None else {}
    za = dict(zip(names_a, ann_out.z)) if ann_out.z is not None else {}
    za_ok = dict(zip(names_a, ann_out.z_valid)) if ann_out.z is not None else {}
    partial_value = None
    if cfg.reward.partial == "embedding":
        # Empty annotated span (never for real data): fall back to ReFT's flat 0.1.
        partial_value = torch.where(za_ok["full"] & zr_ok["full"],
                                    partial_reward_embedding(za["full"], zr["full"]), 0.1)
    scores = score_batch(preds, golds, partial=cfg.reward.partial, partial_value=partial_value,
                         tol=cfg.reward.tolerance).to(run.device)
    action_mask = roll.action_mask()
    with timer("advantages"):
        adv, ret = shaped_advantages(run, scores, old.logp, logp_ref, old.values, action_mask)
    banks = contrastive_banks(cfg.contrastive.signal, correct, za, za_ok, zr, zr_ok)
    counts = torch.tensor([action_mask.sum(), (action_mask.sum(-1) > 0).sum()], dtype=torch.float32,
                          device=run.device)
    dist.all_reduce(counts, group=parallel.dp_group())
    train_names = [] if cfg.contrastive.signal == "none" else names_r
    state = RolloutState(tokens=roll.tokens, lengths=lengths, actions=roll.gen_lens.cpu(), action_mask=action_mask,
                         spans=spans_r if train_names else None, span_names=train_names,
                         logp_old=old.logp, values_old=old.values, advantages=adv, returns=ret, za=za,
                         banks=banks, offset=parallel.dp_rank() * len(records),
                         n_tokens=counts[0].clamp(min=1), n_seqs=counts[1].clamp(min=1))
    train_metrics: dict[str, float] = {}
    with timer("update"):
        for epoch in range(cfg.ppo.ppo_epochs):
            for k, v in ppo_epoch(run, engine, state, step, epoch).items():
                train_metrics[k] = train_metrics.get(k, 0.0) + v / cfg.ppo.ppo_epochs
    metrics = rollout_metrics(run, roll, scores, correct, preds, old.logp, logp_ref, action_mask)
    metrics.update(train_metrics)
    metrics.update(timer.metrics())
    metrics.update(throughput(run, engine.policy, roll, ann, timer))
    return metrics


# --------------------------------------------------------------------------------------------
# Rollout and scoring


def sample_rollouts(run: Run, policy, records, step: int) -> RolloutBatch:
    """Sample one CoT per prompt (``rollout.*`` pinned explicitly); left-padded prompts in."""
    cfg = run.cfg
    if cfg.rollout.samples_per_prompt != 1:
        raise NotImplementedError("config field 'rollout.samples_per_prompt' > 1 is not supported yet "
                                  "(the paper samples one CoT per prompt)")
    prompts = collate_prompts([encode_prompt(r, run.tokenizer, cfg.data.max_prompt_tokens) for r in records],
                              run.tokenizer.pad_id)
    gen = step_generator(run.cfg.seed, step, parallel.dp_rank(), device=run.device)
    return generate(policy, prompts["tokens"].to(run.device), prompts["lengths"].to(run.device),
                    max_new_tokens=cfg.rollout.max_new_tokens, eos_id=run.tokenizer.eos_id,
                    pad_id=run.tokenizer.pad_id, greedy=False, temperature=cfg.rollout.temperature,
                    top_k=cfg.rollout.top_k, top_p=cfg.rollout.top_p, generator=gen)


def score_rollouts(run: Run, records, roll: RolloutBatch) -> list[float | None]:
    """Extracted answers (python style: run in the sandbox)."""
    _, to_extract = decode_generations(run, records, roll.generations())
    return extract_answers_tp(run, to_extract)



def cot_spans(run: Run, records, roll: RolloutBatch):
    """Annotated rows and the span masks of both sides (DESIGN.md Sec. 3-4).

    Returns:
        ann: collated annotated rows (``tokens``, ``target_mask``, ``lengths``) on the device.
        spans_r: ``(K_r, n, L)`` rollout spans or None; spans_a: ``(K_a, n, L_a)`` or None.
        names_r, names_a: span names (``full``: the whole CoT span; ``lcs``: its tokens in the LCS
            with the other side; ``exc``: the rest).
    """
    cfg = run.cfg
    ann = collate_sft([encode_sft(r, run.tokenizer, cfg.data.max_prompt_tokens, cfg.data.max_length)
                       for r in records], run.tokenizer.pad_id)
    ann = {k: v.to(run.device) for k, v in ann.items()}
    signal = cfg.contrastive.signal
    need_full = signal in ("positive", "both") or cfg.reward.partial == "embedding"
    need_neg = signal in ("negative", "both")
    gen_span, target = roll.gen_span(), ann["target_mask"]
    if cfg.data.style == "python":
        target = target & ~_header_mask(run, records, ann)
    names_r, names_a, masks_r, masks_a = [], [], [], []
    if need_full:
        names_r.append("full"), masks_r.append(gen_span)
        names_a.append("full"), masks_a.append(target)
    if need_neg:
        lcs_a, lcs_r = span_lcs_masks(ann["tokens"], target, roll.tokens, gen_span)
        names_r += ["lcs", "exc"]
        masks_r += [lcs_r, gen_span & ~lcs_r]
        names_a.append("exc")
        masks_a.append(target & ~lcs_a)
    spans_r = torch.stack(masks_r) if masks_r else None
    spans_a = torch.stack(masks_a) if masks_a else None
    return ann, spans_r, spans_a, names_r, names_a


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


@dataclass
class _Fwd:
    logp: torch.Tensor | None
    values: torch.Tensor
    z: torch.Tensor | None
    z_valid: torch.Tensor | None


@torch.no_grad()
def forward_batched(model, tokens, lengths, spans, micro_batch: int, need_logp: bool = True) -> _Fwd:
    """No-grad forward in micro-batches, each cut to its longest row, outputs padded back.

    Args:
        model: a ``PolicyModel`` (policy or reference).
        tokens: ``(n, L)`` left-aligned rows; lengths: ``(n,)`` on the host.
        spans: ``(K, n, L)`` bool or None.
        micro_batch: rows per forward.
        need_logp: compute log-probs (the annotated forward needs only values and embeddings).
    """
    was_training = model.training
    model.eval()
    n, L = tokens.shape
    logp = torch.zeros((n, L), device=tokens.device) if need_logp else None
    values = torch.zeros((n, L), device=tokens.device)
    zs, oks = [], []
    for s in range(0, n, micro_batch):
        rows = slice(s, min(n, s + micro_batch))
        width = int(lengths[rows].max())
        out = model(tokens[rows, :width], span_masks=None if spans is None else spans[:, rows, :width],
                    need_logp=need_logp)
        if need_logp:
            logp[rows, :width] = out.logp
        values[rows, :width] = out.values
        if spans is not None:
            zs.append(out.z)
            oks.append(out.z_valid)
    model.train(was_training)
    z = torch.cat(zs, dim=1) if zs else None
    ok = torch.cat(oks, dim=1) if oks else None
    return _Fwd(logp, values, z, ok)


def shaped_advantages(run: Run, scores, logp_old, logp_ref, values, action_mask):
    """KL-shaped rewards, GAE and whitening: the fused pass plus one all-reduce of moments."""
    p = run.cfg.ppo
    impl = "auto" if run.device.type == "cuda" and run.cfg.model.kernels == "auto" else "ref"
    out = fused_advantages(scores, logp_old, logp_ref, values, action_mask, p.kl_coef, p.gamma, p.lam, impl=impl)
    if p.whiten_advantages == "none":
        return out.advantages, out.returns
    group = parallel.dp_group() if p.whiten_advantages == "global" else None
    moments = global_moments(out.row_sum, out.row_sumsq, out.row_count, group=group)
    adv = whiten_from_moments(out.advantages, action_mask, *moments, shift_mean=p.whiten_shift_mean)
    return adv, out.returns


def contrastive_banks(signal, correct, za, za_ok, zr, zr_ok) -> dict[str, InfoNCEBank]:
    """Gather the detached global banks once per rollout batch (algos/contrastive.py docstring)."""
    group, banks = parallel.dp_group(), {}
    if signal in ("positive", "both"):
        select = correct & za_ok["full"] & zr_ok["full"]  # M1
        banks["pos"], _ = build_bank(za["full"], zr["full"], zr["full"], select, zr_ok["full"], group)
    if signal in ("negative", "both"):
        select = ~correct & zr_ok["lcs"] & za_ok["exc"]  # M2
        banks["neg"], _ = build_bank(zr["lcs"], za["exc"], zr["exc"], select, zr_ok["exc"], group)
    return banks


# --------------------------------------------------------------------------------------------
# PPO epoch


def ppo_epoch(run: Run, engine: Engine, st: RolloutState, step: int, epoch: int) -> dict[str, float]:
    """One pass over the local rollout rows in shuffled micro-batches, then one optimizer step."""
    cfg = run.cfg
    n = st.tokens.shape[0]
    order = torch.randperm(n, generator=step_generator(cfg.seed, step, epoch, parallel.dp_rank()))
    engine.zero_grad()
    finite = torch.ones((), dtype=torch.bool, device=run.device)
    sums: dict[str, torch.Tensor] = {}
    total_actions = max(1, int(st.actions.sum()))
    for s in range(0, n, cfg.ppo.micro_batch_size):
        idx_cpu = order[s:s + cfg.ppo.micro_batch_size]
        idx = idx_cpu.to(run.device)
        cols = slice(0, int(st.lengths[idx_cpu].max()))  # host tensor: no device sync
        out = engine.ddp(st.tokens[idx, cols],
                         span_masks=None if st.spans is None else st.spans[:, idx, cols])
        mask = st.action_mask[idx, cols]
        agg = dict(agg=cfg.ppo.loss_agg, num_tokens=st.n_tokens, num_seqs=st.n_seqs)
        pg, m_pg = ppo_policy_loss(out.logp, st.logp_old[idx, cols], st.advantages[idx, cols], mask,
                                   cfg.ppo.clip_eps, **agg)
        vf, m_vf = ppo_value_loss(out.values, st.values_old[idx, cols], st.returns[idx, cols], mask,
                                  cfg.ppo.value_clip, **agg)
        cl, m_cl = contrastive_loss(cfg.contrastive, out, st, idx)
        if step < cfg.ppo.critic_warmup_steps:  # the critic learns first; the policy stays put
            loss = cfg.ppo.vf_coef * vf + 0.0 * (pg + cl)
        else:
            loss = pg + cfg.ppo.vf_coef * vf + cfg.contrastive.coef * cl
        finite &= torch.isfinite(loss)
        engine.backward(loss)
        # Loss shares add up to the global loss; rates are averaged, weighted by action tokens.
        # Kept on the device: one transfer per epoch instead of one per metric and micro-batch.
        frac = float(st.actions[idx_cpu].sum()) / total_actions
        for k, v in {**m_pg, **m_vf, **m_cl, "loss": loss.detach()}.items():
            v = torch.as_tensor(v, device=run.device).double()
            sums[k] = sums.get(k, 0.0) + (v if _is_share(k) else v * frac)
    keys = sorted(sums)
    t = torch.stack([sums[k] for k in keys])
    dist.all_reduce(t, group=parallel.dp_group())
    dp = parallel.dp_size()
    metrics = {k: v if _is_share(k) else v / dp for k, v in zip(keys, t.tolist())}
    metrics.update(engine.optimizer_step(finite))
    return metrics


def _is_share(key: str) -> bool:
    """Metrics that are shares of a global sum (losses, counts) rather than local rates."""
    return key == "loss" or key.endswith(("/loss", "_loss", "_count"))


def contrastive_loss(ccfg, out, st: RolloutState, idx: torch.Tensor):
    """This micro-batch's share of the contrastive loss for ``contrastive.signal``."""
    if ccfg.signal == "none":
        return out.values.new_zeros(()), {}
    z = dict(zip(st.span_names, out.z))
    local_index = st.offset + idx
    terms, metrics = [], {}
    if ccfg.signal in ("positive", "both"):
        bank = st.banks["pos"]
        loss, m = contrastive_positive(st.za["full"][idx], z["full"], bank.select[local_index],
                                       bank.cand_valid[local_index], tau=ccfg.tau, bank=bank,
                                       local_index=local_index, clamp_pos_cos=ccfg.clamp_positive_cos)
        terms.append(loss)
        metrics.update(m)
    if ccfg.signal in ("negative", "both"):
        bank = st.banks["neg"]
        loss, m = contrastive_negative(z["lcs"], st.za["exc"][idx], z["exc"], bank.select[local_index],
                                       bank.cand_valid[local_index], tau=ccfg.tau, bank=bank,
                                       local_index=local_index)
        terms.append(loss)
        metrics.update(m)
    total = terms[0] if len(terms) == 1 else 0.5 * (terms[0] + terms[1])
    metrics["contrastive/loss"] = total.detach()
    return total, metrics


# --------------------------------------------------------------------------------------------
# Metrics


def _global_sum(values: list[float], device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, group=parallel.dp_group())
    return t.tolist()


def rollout_metrics(run, roll, scores, correct, preds, logp_old, logp_ref, action_mask) -> dict[str, float]:
    m = action_mask.float()
    kl = ((logp_old - logp_ref) * m).sum()
    mismatch = ((roll.sample_logp - logp_old).abs() * m).amax() if m.any() else torch.zeros(())
    n, extracted, acc, score, gen_len, eos, kl_sum, tok = _global_sum([
        len(preds), sum(p is not None for p in preds), float(correct.sum()), float(scores.sum()),
        float(roll.gen_lens.sum()), float(roll.finished.sum()), float(kl), float(m.sum())], run.device)
    mm = mismatch.detach().reshape(1).double()
    dist.all_reduce(mm, op=dist.ReduceOp.MAX, group=parallel.dp_group())
    return {"reward/score": score / n, "reward/accuracy": acc / n, "reward/extracted": extracted / n,
            "rollout/gen_len": gen_len / n, "rollout/eos_frac": eos / n, "rollout/kl": kl_sum / max(1.0, tok),
            "rollout/logp_mismatch_max": mm.item(), "rollout/tokens": gen_len}


# bf16 dense peak FLOP/s per GPU for MFU (vendor data sheets).
_PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def throughput(run, policy, roll, ann, timer) -> dict[str, float]:
    """Rollout tokens/s and, on a known GPU, model FLOPs utilisation (6N per trained token, 2N per
    forward or generated token; attention FLOPs ignored)."""
    t = timer.times
    gen_tokens = _global_sum([float(roll.gen_lens.sum())], run.device)[0]
    out = {"perf/rollout_tokens_per_s": gen_tokens / max(t.get("rollout", 0.0), 1e-9)}
    if run.device.type == "cuda":
        name = torch.cuda.get_device_name()
        peak = next((v for k, v in _PEAK_FLOPS.items() if k in name), None)
        if peak:
            n_params = sum(p.numel() for p in policy.parameters()) * parallel.tp_size()
            rows = float(roll.lengths.sum())
            fwd = 2 * n_params * (rows * 2 + float(ann["lengths"].sum()))  # old + ref + annotated
            gen = 2 * n_params * (float(roll.lengths.sum()))
            train = 6 * n_params * rows * run.cfg.ppo.ppo_epochs
            flops_per_gpu = (fwd + gen + train) / parallel.tp_size()
            out["perf/mfu"] = flops_per_gpu / (sum(t.values()) * peak)
    return out


# --------------------------------------------------------------------------------------------
# The stage


def _frozen_reference(run: Run, init: CheckpointRef | None, policy):
    """The KL reference: the SFT checkpoint, or (no SFT) a copy of the initial policy."""
    from carft_mega.models.build import build_model_skeleton, load_policy_checkpoint

    if init is not None:
        ref = load_policy_checkpoint(init.path, run.cfg.model)
    else:
        ref = build_model_skeleton(policy.arch, run.cfg.model, policy.padded_vocab_size)
        ref.load_state_dict(policy.state_dict())
    ref = ref.to(run.device)
    ref.requires_grad_(False)
    return ref.eval()


def run_carft(run: Run, init: CheckpointRef | None, resume: CheckpointRef | None) -> None:
    """Train the RL stage from ``init`` (the SFT checkpoint; None = ``model.source``), resuming
    from ``resume`` when given."""
    from carft_mega.models.build import load_policy_checkpoint

    cfg = run.cfg
    total = rl_total_steps(cfg, len(run.train))
    policy = load_policy_checkpoint(init.path, cfg.model).to(run.device) if init is not None \
        else build_initial_policy(run)
    ref_model = _frozen_reference(run, init, policy)
    U = cfg.ppo.ppo_epochs  # one optimizer step per PPO epoch
    engine = build_engine(policy, cfg.optim, peak_lr=cfg.ppo.lr, schedule=cfg.ppo.schedule,
                          warmup_ratio=cfg.ppo.warmup_ratio, total_steps=total * U,
                          distributed_optimizer=cfg.parallel.distributed_optimizer)
    if resume is not None:
        load_engine(engine, resume.path)
        state = run.ckpts.read_state(resume)
        engine.step, engine.nonfinite_streak = state["step"], state["nonfinite_streak"]
    elif not cfg.sft.enabled:
        run.results["initial_accuracy"] = evaluate(run, engine.policy, tag="carft_step0")
        run.print(f"accuracy before RL: {run.results['initial_accuracy']:.4f}")
    name = "ReFT" if cfg.contrastive.signal == "none" else f"CARFT ({cfg.contrastive.signal} signal)"
    run.print(f"{name}: {total} rollout steps of {cfg.ppo.rollout_batch_size} prompts, "
              f"{cfg.ppo.ppo_epochs} PPO epochs each, lr {cfg.ppo.lr}")
    run.logger.start_stage("carft", total, engine.step // U)
    init_path = init.path if init is not None else None
    while engine.step < total * U:
        step = engine.step // U  # the rollout step (the data cursor)
        metrics = carft_step(run, engine, ref_model, step)
        done = step + 1
        if cfg.logging.eval_every and done % cfg.logging.eval_every == 0 and done < total:
            metrics["eval/accuracy"] = evaluate(run, engine.policy, tag=f"carft_step{done}")
        skipped = metrics.get("optim/skipped", 0.0) > 0.0
        if skipped:
            run.print(f"RL step {done}: update skipped, non-finite loss or gradient "
                      f"({engine.nonfinite_streak} in a row, the run stops at {cfg.ppo.max_nonfinite_steps})")
        run.logger.log("carft", done, metrics if skipped or done % cfg.logging.log_every == 0 or done == total else {})
        run.logger.maybe_plot(done)
        if engine.nonfinite_streak >= cfg.ppo.max_nonfinite_steps:
            raise TrainingStopped(f"RL stopped at step {done}: {engine.nonfinite_streak} consecutive updates with "
                                  f"a non-finite loss or gradient (ppo.max_nonfinite_steps)")
        if cfg.checkpoint.save_every and done % cfg.checkpoint.save_every == 0 and done < total:
            save_carft(run, engine, done, init_path)
    # Resumed from the final checkpoint (a crash in the export or evaluation after it): keep it.
    final = resume if resume is not None and resume.step >= total else save_carft(run, engine, total, init_path)
    export_stage_hf(run, engine, "carft")
    acc = evaluate(run, engine.policy, tag=f"carft_step{total}")
    run.results["carft_accuracy"] = acc
    run.results["final_checkpoint"] = final.path
    run.logger.log("carft", total, {"eval/accuracy": acc}, advance=False)
    run.print(f"accuracy after {name}: {acc:.4f} on {len(run.test)} test problems")


def save_carft(run: Run, engine: Engine, step: int, init_path: str | None) -> CheckpointRef:
    state = {"stage": "carft", "step": engine.step, "rollout_step": step, "total_steps": engine.total_steps,
             "nonfinite_streak": engine.nonfinite_streak,
             # Relative to the checkpoints folder, so a run directory can be moved and still resume.
             "init_checkpoint": None if init_path is None else os.path.relpath(init_path, run.ckpts.root)}
    return run.ckpts.save("carft", step, lambda d: save_engine(engine, d, run.tokenizer_dir), state)
