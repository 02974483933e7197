"""What a person watching a run sees: progress-bar labels, TensorBoard tags and x axis, the KL that
compare_logits prints (issue 13, item 7)."""

import json
import os

import torch

from carft_mega.models.pipelines import kl_per_position
from carft_mega.trainer.metrics import BAR_LABELS, MetricsLogger


def _events(tb_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir))
    acc.Reload()
    return {tag: acc.Scalars(tag) for tag in acc.Tags()["scalars"]}


def test_bar_labels_tensorboard_tags_and_one_run_step_axis(tmp_path):
    log = MetricsLogger(str(tmp_path), tensorboard=True, progress_bar=True, plot=False)
    log.set_stage_offsets(3)  # 3 SFT steps, then RL step s at x = 3 + s
    log.start_stage("sft", 3)
    for s in (1, 2, 3):
        log.log("sft", s, {"sft/loss": 2.0 / s, "optim/lr": 1e-3})
    log.log("sft", 3, {"eval/accuracy": 0.125}, advance=False)
    log.start_stage("carft", 2)
    log.log("carft", 1, {"loss": 1.5, "contrastive/loss": 0.25, "reward/accuracy": 0.5, "eval/accuracy": 0.375,
                         "optim/lr": 1e-4})
    postfix = log._bar.postfix
    log.close()
    # The bar shows the total loss as `loss` and the contrastive one under its own label; the two
    # accuracies are told apart.
    assert "loss=1.5" in postfix and "cl_loss=0.25" in postfix, postfix
    assert "train_acc=0.5" in postfix and "test_acc=0.375" in postfix, postfix
    assert len(set(BAR_LABELS.values())) == len(BAR_LABELS) - 1  # only sft/loss and loss share `loss`
    ev = _events(tmp_path / "tb")
    # Tags are the metrics.jsonl names: no doubled stage prefix, no wall-clock "time" scalar.
    assert set(ev) == {"sft/loss", "optim/lr", "eval/accuracy", "loss", "contrastive/loss", "reward/accuracy"}
    assert [e.step for e in ev["sft/loss"]] == [1, 2, 3]
    assert [e.step for e in ev["loss"]] == [4]  # RL step 1 follows SFT step 3
    assert [(e.step, e.value) for e in ev["eval/accuracy"]] == [(3, 0.125), (4, 0.375)]
    assert [e.step for e in ev["optim/lr"]] == [1, 2, 3, 4]  # one curve across both stages
    with open(tmp_path / "metrics.jsonl") as f:
        rows = [json.loads(x) for x in f]
    assert ev["loss"][0].wall_time == rows[-1]["time"]  # the wall time is the event's, not a scalar


def test_compare_logits_kl_is_never_negative():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 4096, generator=g) * 3
    lp_p = torch.log_softmax(logits, -1)
    lp_q = torch.log_softmax(logits + 1e-7 * torch.randn(64, 4096, generator=g), -1)
    raw = (lp_p.exp() * (lp_p - lp_q)).sum(-1)
    assert (raw < 0).any()  # the fp32 rounding that printed KL = -3.6e-09
    kl = kl_per_position(lp_p, lp_q)
    assert (kl >= 0).all() and torch.equal(kl, raw.clamp(min=0))
    far = kl_per_position(lp_p, torch.log_softmax(torch.zeros_like(logits), -1))
    assert (far > 0.1).all()  # a real divergence is untouched
