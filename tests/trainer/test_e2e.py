"""End-to-end runs of the trainer on the synthetic task with a tiny model (CPU, gloo).

* SFT -> CARFT at TP=1 in process, and at TP=2 x DP=1 under torchrun;
* resuming from a mid-run checkpoint reproduces the next steps of the uninterrupted run exactly;
* ReFT and CARFT differ only by the contrastive term (with c = 0 they are bit-identical).
"""

import json
import os
import shutil
import subprocess
import sys

import pytest

from carft_mega.config import load_config

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

TINY = [
    "model.source=tiny", "model.tiny.hidden_size=32", "model.tiny.num_layers=2", "model.tiny.num_heads=4",
    "model.tiny.num_kv_heads=2", "model.tiny.ffn_hidden_size=64",
    "data.dataset=synthetic", "data.synthetic_train_size=64", "data.synthetic_test_size=8",
    "data.max_prompt_tokens=160", "data.max_length=200",
    "sft.max_steps=3", "sft.global_batch_size=8", "sft.micro_batch_size=4", "sft.lr=1e-3",
    "ppo.rollout_batch_size=8", "ppo.micro_batch_size=4", "ppo.lr=1e-4",
    "rollout.max_new_tokens=24", "rollout.eval_max_new_tokens=24", "rollout.eval_batch_size=8",
    "logging.progress_bar=false", "logging.tensorboard=false", "logging.plot=false", "logging.eval_every=0",
]


def run_in_process(out_dir, *extra):
    from carft_mega.trainer.run import run_training

    cfg = load_config(None, TINY + [f"out_dir={out_dir}", *extra])
    return run_training(cfg)


def rows(out_dir, stage):
    """Per-step training rows of a stage (eval-only rows excluded)."""
    key = "sft/loss" if stage == "sft" else "loss"
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["stage"] == stage and key in r]


def strip_time(r):
    return {k: v for k, v in r.items() if not k.startswith(("time", "perf")) and k != "time"}


def test_sft_then_carft_tp1_and_exact_resume(tmp_path):
    a = str(tmp_path / "a")
    res = run_in_process(a, "ppo.max_steps=4", "checkpoint.save_every=2", "contrastive.signal=both")
    assert 0.0 <= res["sft_accuracy"] <= 1.0 and 0.0 <= res["carft_accuracy"] <= 1.0
    full = [strip_time(r) for r in rows(a, "carft")]
    assert [r["step"] for r in full] == [1, 2, 3, 4]
    for r in full:
        assert all(v == v for v in r.values() if isinstance(v, float))  # no NaN
    assert any(r["contrastive/pos_count"] > 0 or r["contrastive/neg_count"] > 0 for r in full)
    assert os.path.exists(os.path.join(a, "eval", "carft_step4.jsonl"))
    # Interrupt after RL step 2: keep only what existed then, and resume.
    b = str(tmp_path / "b")
    shutil.copytree(a, b)
    shutil.rmtree(os.path.join(b, "checkpoints", "carft", "step_00000004"))
    res_b = run_in_process(b, "ppo.max_steps=4", "checkpoint.save_every=2", "contrastive.signal=both")
    resumed = [strip_time(r) for r in rows(b, "carft")]
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    assert resumed == full  # the same losses, rewards and gradient norms, exactly
    assert res_b["carft_accuracy"] == res["carft_accuracy"]


def test_reft_and_carft_differ_only_by_the_contrastive_term(tmp_path):
    common = ["ppo.max_steps=1", "ppo.ppo_epochs=1", "reward.partial=reft"]
    reft = run_in_process(str(tmp_path / "reft"), *common, "contrastive.signal=none")
    carft0 = run_in_process(str(tmp_path / "c0"), *common, "contrastive.signal=both", "contrastive.coef=0")
    carft = run_in_process(str(tmp_path / "c1"), *common, "contrastive.signal=both", "contrastive.coef=0.5",
                           "checkpoint.export_hf=true")
    r, c0, c1 = (strip_time(rows(str(tmp_path / d), "carft")[0]) for d in ("reft", "c0", "c1"))
    shared = [k for k in r if k.startswith(("reward/", "rollout/", "actor/", "critic/"))]
    for k in shared:  # same rollouts, rewards, advantages and PPO terms in the first epoch
        assert r[k] == c0[k] == c1[k], k
    assert not any(k.startswith("contrastive/") for k in r)
    assert c1["loss"] == pytest.approx(r["loss"] + 0.5 * c1["contrastive/loss"], rel=1e-5, abs=1e-7)
    assert c1["contrastive/loss"] != 0.0
    # With c = 0 the update is bit-identical to ReFT's: same gradient, same greedy outputs after it.
    assert r["optim/grad_norm"] == c0["optim/grad_norm"]
    assert c1["optim/grad_norm"] != r["optim/grad_norm"]

    def evals(d):
        with open(os.path.join(str(tmp_path / d), "eval", "carft_step1.jsonl")) as f:
            return [json.loads(x)["generation"] for x in f]
    assert evals("reft") == evals("c0")
    assert reft["carft_accuracy"] == carft0["carft_accuracy"] and 0.0 <= carft["carft_accuracy"] <= 1.0
    # checkpoint.export_hf: an HF model (and the CoT head under TRL's v_head names) per stage, with
    # the character tokenizer as an equivalent HF tokenizer; files follow the umask (not 0600).
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from carft_mega.data.tokenizers import CharTokenizer
    mask = os.umask(0)
    os.umask(mask)
    text = "Question: Tom has 3 apples.\nTherefore, the answer is: 7"
    for stage in ("sft", "carft"):
        d = tmp_path / "c1" / "hf" / stage
        model = AutoModelForCausalLM.from_pretrained(str(d))
        assert model.config.num_hidden_layers == 2 and model.config.eos_token_id == CharTokenizer.EOS
        assert (d / "v_head.safetensors").exists()
        tok = AutoTokenizer.from_pretrained(str(d))
        assert tok.encode(text, add_special_tokens=False) == CharTokenizer().encode(text)
        assert tok.decode(CharTokenizer().encode(text)) == text and tok.eos_token_id == CharTokenizer.EOS
        for f in os.listdir(d):
            assert os.stat(d / f).st_mode & 0o777 == 0o666 & ~mask, f


@pytest.mark.slow
def test_tp2_under_torchrun(tmp_path):
    out = str(tmp_path / "tp2")
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "carft_mega.train", *TINY, f"out_dir={out}", "parallel.tp=2", "ppo.max_steps=2",
           "contrastive.signal=both"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "accuracy after CARFT" in proc.stdout
    got = rows(out, "carft")
    assert [r["step"] for r in got] == [1, 2]
    # Same run at TP=1: rewards and PPO losses agree to fp32 tolerance (TP changes summation order).
    run_in_process(str(tmp_path / "tp1"), "ppo.max_steps=2", "contrastive.signal=both")
    ref = rows(str(tmp_path / "tp1"), "carft")
    assert got[0]["reward/score"] == ref[0]["reward/score"]
    assert got[0]["rollout/gen_len"] == ref[0]["rollout/gen_len"]
    assert got[0]["critic/vf_loss"] == pytest.approx(ref[0]["critic/vf_loss"], rel=1e-3, abs=1e-6)


def test_critic_warmup_leaves_the_policy_untouched(tmp_path):
    """With the head's gradient kept out of the trunk, a critic-warm-up step changes no policy
    weight: the next rollout's KL to the reference is exactly 0 (it is not without warm-up)."""
    common = ["ppo.max_steps=2", "model.head_trunk_grad_scale=0.0", "logging.eval_every=0"]
    run_in_process(str(tmp_path / "w"), *common, "ppo.critic_warmup_steps=1")
    run_in_process(str(tmp_path / "n"), *common, "ppo.critic_warmup_steps=0")
    warm, no_warm = rows(str(tmp_path / "w"), "carft"), rows(str(tmp_path / "n"), "carft")
    assert warm[1]["rollout/kl"] == 0.0 and warm[0]["critic/vf_loss"] > 0.0
    assert no_warm[1]["rollout/kl"] != 0.0


@pytest.mark.skipif(not os.path.exists(os.path.join(os.environ.get("CARFT_DATA_DIR", ""), "svamp")),
                    reason="needs CARFT_DATA_DIR with svamp/ (the repository's shared data)")
def test_python_style_rl_step_runs_programs_in_the_sandbox(tmp_path):
    """A CARFT step on SVAMP python_sdp: the rollouts' programs run in the sandbox and its outcomes
    are logged per step; none of them fails because of the sandbox itself."""
    out = str(tmp_path / "py")
    run_in_process(out, "data.dataset=svamp", "data.style=python", f"data.data_dir={os.environ['CARFT_DATA_DIR']}",
                   "data.max_prompt_tokens=400", "data.max_length=1000", "data.train_limit=16", "data.eval_limit=8",
                   "sft.max_steps=1", "ppo.max_steps=1",
                   "reward.sandbox_workers=1", "contrastive.signal=positive")
    (r,) = rows(out, "carft")
    counts = {k: r[k] for k in r if k.startswith("sandbox/")}
    assert set(counts) == {"sandbox/sandbox_error", "sandbox/timeout", "sandbox/crashed", "sandbox/worker_died",
                           "sandbox/worker_hung", "sandbox/rejected"}, counts
    assert counts["sandbox/sandbox_error"] == 0 and counts["sandbox/worker_died"] == 0
    assert 0.0 <= r["reward/extracted"] <= 1.0
