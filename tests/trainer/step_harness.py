"""One RL step of the trainer outside a full run: build the run context, a tiny policy, its frozen
reference and engine, then ``make_experience`` and ``update`` (trainer/carft.py).

In process: ``one_step(out_dir, overrides)``. Under torchrun (data parallel):
``python -m torch.distributed.run --nproc_per_node 2 tests/trainer/step_harness.py OUT_JSON OVERRIDES...``
writes rank 0's result as JSON.

Scoring is replaced by a fixed rule (a record is answered correctly when its gold answer is even),
so that a random tiny model still has both correct and wrong rollouts for the two contrastive
signals, and the rule does not depend on where a row lands.
"""

from __future__ import annotations

import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

TINY = [
    "model.source=tiny", "model.tiny.hidden_size=32", "model.tiny.num_layers=2", "model.tiny.num_heads=4",
    "model.tiny.num_kv_heads=2", "model.tiny.ffn_hidden_size=64",
    "data.dataset=synthetic", "data.synthetic_train_size=64", "data.synthetic_test_size=8",
    "data.max_prompt_tokens=160", "data.max_length=200", "sft.enabled=false",
    "ppo.rollout_batch_size=8", "ppo.micro_batch_size=4", "ppo.lr=1e-3", "ppo.ppo_epochs=2",
    "rollout.max_new_tokens=12", "logging.progress_bar=false", "logging.tensorboard=false",
    "logging.plot=false", "checkpoint.resume=none",
]

COMPARED = ("loss", "actor/pg_loss", "actor/clipfrac", "critic/vf_loss", "contrastive/loss",
            "contrastive/pos_loss", "contrastive/neg_loss", "contrastive/pos_cos", "contrastive/neg_cos",
            "contrastive/pos_count", "contrastive/neg_count", "actor/kl_loss", "optim/grad_norm")


def fake_preds(records, roll):
    """The gold answer for records with an even gold answer, gold + 1 otherwise (never None)."""
    return [r.answer if int(r.answer) % 2 == 0 else r.answer + 1 for r in records]


def one_step(out_dir: str, overrides: list[str], keep=None) -> dict:
    """Run one RL step; returns rollout metrics, per-epoch metrics and (with ``keep``) the objects
    ``keep`` asks for: any of ``exp``, ``run``, ``engine``, ``policy``, ``ref``."""
    import torch

    import carft_mega.trainer.carft as carft
    from carft_mega import parallel
    from carft_mega.config import load_config
    from carft_mega.models.build import frozen_copy
    from carft_mega.trainer.context import build_initial_policy, setup_run
    from carft_mega.trainer.engine import build_engine
    from carft_mega.trainer.metrics import StageTimer

    cfg = load_config(None, TINY + [f"out_dir={out_dir}", *overrides])
    real = carft.score_rollouts
    carft.score_rollouts = lambda run, records, roll: fake_preds(records, roll)
    run = setup_run(cfg)
    try:
        policy = build_initial_policy(run)
        ref = frozen_copy(policy, cfg.model)
        engine = build_engine(policy, cfg.optim, peak_lr=cfg.ppo.lr, schedule="constant", warmup_ratio=0.0,
                              total_steps=10, distributed_optimizer=cfg.parallel.distributed_optimizer)
        terms = carft.build_terms(cfg)
        exp = carft.make_experience(run, engine.policy, ref, 0, terms, StageTimer())
        epochs = carft.update(run, engine, exp, terms, 0)
        out = {"rollout": exp.metrics, "epochs": epochs,
               "prompt_ids": exp.prompt_ids.tolist(), "lengths": exp.lengths.tolist()}
        objs = {"exp": exp, "run": run, "engine": engine, "policy": policy, "ref": ref}
        for k in keep or ():
            out[k] = objs[k]
        torch.distributed.barrier()
        return out
    finally:
        carft.score_rollouts = real
        run.logger.close()
        if not keep:
            parallel.destroy()


if __name__ == "__main__":  # torchrun entry (dist_checkpointing's spawn re-imports __main__: keep the guard)
    out_json, *ov = sys.argv[1:]
    res = one_step(os.path.dirname(out_json), ov)
    if int(os.environ.get("RANK", "0")) == 0:
        with open(out_json, "w") as f:
            json.dump(res, f)
