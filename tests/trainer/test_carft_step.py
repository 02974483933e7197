"""One RL step of the trainer (make_experience + update) on a tiny model, CPU/gloo:

* invariance: a whole step (rollout, experience, both PPO epochs) gives the same losses, metrics
  and gradient norms at micro-batch size 8 and 1, and at DP 1 and 2 (torchrun); without the bank
  refresh before epoch 2 it does not (DESIGN.md Sec. 4);
* the training-side log-probs (old, reference) are those of softmax(logits / T) at the sampling
  temperature, independently recomputed;
* advantages are centred by default (ReFT's whitening);
* the contrastive metrics are means over the selected anchors;
* G > 1: prompt ids, per-prompt annotated forwards, and Dr.GRPO's advantage and loss.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from tests.trainer.step_harness import COMPARED, REPO, one_step

CARFT = ["contrastive.signal=both", "contrastive.coef=1.0", "reward.partial=embedding"]


def _close(a: dict, b: dict, what: str, rel=2e-4, abs_=2e-6):
    for k in COMPARED:
        if k in a or k in b:
            assert k in a and k in b, (what, k)
            assert a[k] == pytest.approx(b[k], rel=rel, abs=abs_), (what, k, a[k], b[k])


def _torchrun(tmp_path, name, overrides):
    out = tmp_path / name / "res.json"
    out.parent.mkdir(parents=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(REPO, "tests", "trainer", "step_harness.py"), str(out), *overrides]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return json.loads(out.read_text())


def test_whole_step_is_invariant_to_micro_batch_and_data_parallel_size(tmp_path, monkeypatch):
    big = one_step(str(tmp_path / "mb8"), CARFT + ["ppo.micro_batch_size=8"])
    small = one_step(str(tmp_path / "mb1"), CARFT + ["ppo.micro_batch_size=1"])
    dp2 = _torchrun(tmp_path, "dp2", CARFT + ["ppo.micro_batch_size=3"])
    e = big["epochs"]
    assert e[0]["contrastive/pos_count"] > 0 and e[0]["contrastive/neg_count"] > 0  # both signals at work
    assert e[0]["optim/skipped"] == 0.0 and e[1]["optim/grad_norm"] > 0.0
    assert big["rollout"]["reward/score"] == pytest.approx(dp2["rollout"]["reward/score"], rel=1e-6)  # same samples
    assert big["rollout"]["rollout/gen_len"] == dp2["rollout"]["rollout/gen_len"]
    for epoch in (0, 1):
        _close(big["epochs"][epoch], small["epochs"][epoch], f"mb 8 vs 1, epoch {epoch + 1}")
        _close(big["epochs"][epoch], dp2["epochs"][epoch], f"dp 1 vs 2, epoch {epoch + 1}")

    # Without the refresh, epoch 2 mixes live rows with a bank one optimizer step old: the result
    # then depends on the micro-batch size (one micro-batch of 8 rows has no stale row).
    import carft_mega.trainer.carft as carft
    monkeypatch.setattr(carft, "refresh_rollout_embeddings", lambda *a, **k: None)
    stale_big = one_step(str(tmp_path / "s8"), CARFT + ["ppo.micro_batch_size=8"])
    stale_small = one_step(str(tmp_path / "s1"), CARFT + ["ppo.micro_batch_size=1"])
    _close(stale_big["epochs"][0], stale_small["epochs"][0], "stale, epoch 1")
    g8, g1 = stale_big["epochs"][1]["optim/grad_norm"], stale_small["epochs"][1]["optim/grad_norm"]
    assert abs(g8 - g1) > 1e-3 * g8, (g8, g1)


def test_micro_batch_grouping_changes_nothing(tmp_path, monkeypatch):
    """Length-grouped micro-batches (the default) against shuffled ones of the same size: the same
    step, to fp32 summation-order tolerance."""
    import carft_mega.trainer.carft as carft

    grouped = one_step(str(tmp_path / "g"), CARFT + ["ppo.micro_batch_size=3"])

    def shuffled(lengths, size):
        order = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(5))
        return [order[s:s + size] for s in range(0, len(order), size)]

    monkeypatch.setattr(carft, "micro_batches", shuffled)
    mixed = one_step(str(tmp_path / "s"), CARFT + ["ppo.micro_batch_size=3"])
    assert mixed["rollout"]["perf/pad_frac_forward"] == grouped["rollout"]["perf/pad_frac_forward"]
    for epoch in (0, 1):
        _close(grouped["epochs"][epoch], mixed["epochs"][epoch], f"grouped vs shuffled, epoch {epoch + 1}")


def _behaviour_logp(model, tokens, T):
    """log softmax(logits / T) of each next token, from a plain full-vocabulary forward."""
    with torch.no_grad():
        hidden = model.trunk(tokens)
        logits = model.lm_logits(hidden, gather=True).transpose(0, 1)[..., :model.vocab_size].float()
    lp = torch.log_softmax(logits / T, dim=-1)[:, :-1].gather(-1, tokens[:, 1:, None]).squeeze(-1)
    return F.pad(lp, (0, 1))


@pytest.mark.parametrize("T", [0.6, 1.4])
def test_training_log_probs_are_at_the_sampling_temperature(tmp_path, T):
    from carft_mega import parallel

    res = one_step(str(tmp_path / "t"), ["contrastive.signal=none", f"rollout.temperature={T}"],
                   keep=["exp", "ref"])
    try:
        exp, ref = res["exp"], res["ref"]  # ref: a frozen copy of the rollout-time policy
        m = exp.action_mask
        want = torch.zeros_like(exp.logp_old)
        for b in range(exp.tokens.shape[0]):
            n = int(exp.lengths[b])
            want[b, :n] = _behaviour_logp(ref, exp.tokens[b:b + 1, :n], T)[0]
        torch.testing.assert_close(exp.logp_old[m], want[m], atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(exp.logp_ref[m], want[m], atol=2e-5, rtol=1e-5)
        assert res["rollout"]["rollout/logp_mismatch_max"] < 1e-4  # the sampler's own log-probs agree
        # The epoch-1 ratio is 1: the update's forward is at T too.
        assert res["epochs"][0]["actor/ratio_mean"] == pytest.approx(1.0, abs=1e-5)
    finally:
        parallel.destroy()


def test_advantages_are_centred_by_default(tmp_path):
    from carft_mega import parallel
    from carft_mega.ops.advantages import advantages_ref
    from tests.algos.test_advantage import reft_allgather_masked_whiten

    res = one_step(str(tmp_path / "w"), ["contrastive.signal=none"], keep=["exp", "run"])
    try:
        exp, cfg = res["exp"], res["run"].cfg
        m = exp.action_mask
        a = exp.advantages[m]
        assert abs(a.mean().item()) < 1e-5 and a.var().item() == pytest.approx(1.0, rel=1e-4)
        p = cfg.ppo
        raw = advantages_ref(exp.scores, exp.logp_old, exp.logp_ref, exp.values_old, m, p.kl_coef, p.gamma, p.lam)
        assert abs(raw.advantages[m].mean().item()) > 1e-3  # adding the mean back would show
        expect = reft_allgather_masked_whiten(raw.advantages, m)
        torch.testing.assert_close(exp.advantages[m], expect[m], atol=1e-5, rtol=1e-5)
    finally:
        parallel.destroy()


def test_contrastive_metrics_are_means_over_selected_anchors(tmp_path):
    """Epoch 2 runs on the refreshed embeddings, which are then in exp.zr: its pos_cos is the mean
    of cos(za_i, zr_i) over the correct rows, pos_acc the share of those whose positive beats every
    other rollout, whatever the rows' lengths."""
    from carft_mega import parallel

    res = one_step(str(tmp_path / "m"), ["contrastive.signal=positive", "ppo.micro_batch_size=3"],
                   keep=["exp"])
    try:
        exp, e2 = res["exp"], res["epochs"][1]
        za, zr = exp.za["full"], exp.zr["full"]
        sel = exp.correct & za.valid & zr.valid
        assert 0 < int(sel.sum()) < len(sel)
        cos = F.cosine_similarity(za.z, zr.z, dim=-1)
        sims = F.normalize(za.z, dim=-1) @ F.normalize(zr.z, dim=-1).T
        wins = [bool((sims[i, i] > torch.cat([sims[i, :i], sims[i, i + 1:]])).all()) for i in range(len(sel)) if sel[i]]
        assert e2["contrastive/pos_cos"] == pytest.approx(cos[sel].mean().item(), rel=1e-4)
        assert e2["contrastive/pos_acc"] == pytest.approx(sum(wins) / len(wins), abs=1e-6)
        assert e2["contrastive/pos_count"] == int(sel.sum())
    finally:
        parallel.destroy()


def test_per_prompt_span_layout_round_trips():
    from carft_mega.trainer.carft import _per_prompt, _per_row

    K, P, G, L, d = 2, 3, 4, 5, 6
    masks = torch.rand(K, P * G, L) < 0.5
    pp = _per_prompt(masks, G)
    assert pp.shape == (K * G, P, L)
    for k in range(K):
        for p in range(P):
            for g in range(G):
                assert torch.equal(pp[k * G + g, p], masks[k, p * G + g])
    z = torch.randn(K * G, P, d)
    valid = torch.rand(K * G, P) < 0.5
    zr, vr = _per_row(z, valid, G)
    for k in range(K):
        for p in range(P):
            for g in range(G):
                assert torch.equal(zr[k, p * G + g], z[k * G + g, p]) and vr[k, p * G + g] == valid[k * G + g, p]


@pytest.mark.parametrize("estimator", ["gae", "drgrpo"])
def test_group_sampling_carft_step(tmp_path, estimator):
    """G = 2 with both signals (under GAE, and Dr.GRPO + contrastive): rows come in prompt pairs;
    the annotated CoT of a prompt is pooled once per sample (the same 'full' embedding,
    per-sample 'exc' spans)."""
    from carft_mega import parallel

    res = one_step(str(tmp_path / "g"), CARFT + ["rollout.samples_per_prompt=2", "ppo.rollout_batch_size=4",
                                                 f"ppo.estimator={estimator}"], keep=["exp"])
    try:
        exp = res["exp"]
        assert exp.prompt_ids.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
        za = exp.za["full"].z
        assert torch.equal(za[0::2], za[1::2])
        assert not torch.equal(exp.zr["full"].z[0::2], exp.zr["full"].z[1::2])  # two different samples
        for k in ("contrastive/pos_loss", "contrastive/neg_loss", "loss", "optim/grad_norm"):
            assert all(torch.isfinite(torch.tensor(e[k])) for e in res["epochs"]), k
    finally:
        parallel.destroy()


def test_drgrpo_step(tmp_path):
    """Dr.GRPO: A_i = r_i - mean of its prompt's rows on every action token, no critic, the policy
    loss a token sum over (max_new_tokens x sequences), a k3 KL term."""
    from carft_mega import parallel
    from carft_mega.trainer.carft import build_terms

    ov = ["ppo.estimator=drgrpo", "rollout.samples_per_prompt=2", "contrastive.signal=none",
          "ppo.rollout_batch_size=4", "ppo.kl_coef=0.05"]
    res = one_step(str(tmp_path / "d"), ov, keep=["exp", "run"])
    try:
        exp, cfg = res["exp"], res["run"].cfg
        assert [t.name for t in build_terms(cfg)] == ["policy", "kl"]
        assert exp.values_old is None and exp.returns is None
        r = exp.scores.view(-1, 2)
        adv_rows = (r - r.mean(-1, keepdim=True)).view(-1)
        m = exp.action_mask
        torch.testing.assert_close(exp.advantages, torch.where(m, adv_rows[:, None], 0.0))
        e1 = res["epochs"][0]
        assert not any(k.startswith("critic/") for k in e1)
        budget, n = cfg.rollout.max_new_tokens, exp.tokens.shape[0]
        expect_pg = -(adv_rows * m.sum(-1)).sum().item() / (budget * n)  # ratio 1 in epoch 1
        assert e1["actor/pg_loss"] == pytest.approx(expect_pg, abs=1e-6)
        assert e1["actor/kl_loss"] == pytest.approx(0.0, abs=1e-7)  # the policy is still the reference
        assert res["epochs"][1]["actor/kl_loss"] > 0.0
    finally:
        parallel.destroy()
