"""One CARFT step of the trainer with the fused ops (model.kernels=auto) against the same step with the
PyTorch references (model.kernels=ref): the same rollouts and rewards, and the same losses and gradient
norm within the tolerance of the compute dtype.

Through the public entry points only (load_config + run_training and the metrics.jsonl they write), on a
GPU (``gpu`` marker): bf16, the Triton kernels compiled, the CUDA LCS. On a CPU the trainer runs the
references under either setting (the Triton interpreter is a test tool, not a CPU backend), so there is
nothing to compare there; the comparison itself is checked on made-up rows. A counter on each op's kernel
entry shows that auto did run the kernels (else equality with ref would prove nothing).
"""

import json
import os

import pytest
from carft_mega.config import load_config

# A tiny random Llama, RL only (no SFT), one rollout batch, both contrastive signals (so the LCS runs),
# reft partial rewards (the scores then depend on the answers only, not on the CoT embeddings).
TINY_STEP = [
    "model.source=tiny", "model.tiny.hidden_size=64", "model.tiny.num_layers=2", "model.tiny.num_heads=4",
    "model.tiny.num_kv_heads=2", "model.tiny.ffn_hidden_size=128",
    "data.dataset=synthetic", "data.synthetic_train_size=64", "data.synthetic_test_size=4", "data.eval_limit=2",
    "data.max_prompt_tokens=160", "data.max_length=200",
    "sft.enabled=false", "ppo.max_steps=1", "ppo.ppo_epochs=2", "ppo.rollout_batch_size=8",
    "ppo.micro_batch_size=4", "ppo.lr=1e-4",
    "rollout.max_new_tokens=24", "rollout.eval_max_new_tokens=8", "rollout.eval_batch_size=4",
    "contrastive.signal=both", "contrastive.coef=0.5", "reward.partial=reft",
    "logging.progress_bar=false", "logging.tensorboard=false", "logging.plot=false", "logging.eval_every=0",
    "checkpoint.save_every=0", "checkpoint.resume=none",
]
SAME = ("reward/score", "reward/accuracy", "rollout/gen_len", "rollout/tokens", "rollout/eos_frac")
CLOSE = ("loss", "actor/pg_loss", "critic/vf_loss", "critic/vpred_mean", "contrastive/loss",
         "contrastive/neg_loss", "contrastive/pos_loss", "optim/grad_norm")


def _carft_row(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        rows = [r for r in map(json.loads, f) if r.get("stage") == "carft" and "loss" in r]
    assert [r["step"] for r in rows] == [1], rows
    return rows[0]


def _count_kernel_calls(monkeypatch):
    """Counts the entries into the three fused ops' kernels (cot_head and advantages Triton modules,
    the compiled LCS); the ops look these names up at call time."""
    import carft_mega.ops.advantages as adv_op
    import carft_mega.ops.cot_head as head_op
    import carft_mega.ops.lcs as lcs_op

    calls = {"cot_head": 0, "advantages": 0, "lcs_masks_cuda": 0, "lcs_masks_cpu": 0}

    def counted(name, real):
        def wrapper(*a, **kw):
            calls[name] += 1
            return real(*a, **kw)
        return wrapper

    monkeypatch.setattr(head_op, "_kernels", counted("cot_head", head_op._kernels))
    monkeypatch.setattr(adv_op, "_kernels", counted("advantages", adv_op._kernels))
    if lcs_op._C is not None:
        class CountedExt:
            def __getattr__(self, attr):
                real = getattr(lcs_op._C_real, attr)
                return counted(attr, real) if attr in calls else real
        monkeypatch.setattr(lcs_op, "_C_real", lcs_op._C, raising=False)
        monkeypatch.setattr(lcs_op, "_C", CountedExt())
    return calls


def _run(tmp_path, name, kernels, dtype, monkeypatch):
    from carft_mega.trainer.run import run_training

    calls = _count_kernel_calls(monkeypatch)
    out = str(tmp_path / name)
    run_training(load_config(None, TINY_STEP + [f"out_dir={out}", f"model.kernels={kernels}",
                                                f"model.dtype={dtype}"]))
    monkeypatch.undo()
    return _carft_row(out), calls


def _compare(ref, auto, rel, abs_):
    for k in SAME:  # the rollout does not involve the fused ops: bit-identical samples and rewards
        assert ref[k] == auto[k], f"{k}: ref {ref[k]} != auto {auto[k]} (the rollouts differ)"
    assert ref["contrastive/neg_count"] + ref["contrastive/pos_count"] > 0, "no contrastive pair: nothing compared"
    bad = {k: (ref[k], auto[k]) for k in CLOSE if k in ref and abs(ref[k] - auto[k]) > rel * abs(ref[k]) + abs_}
    assert not bad, f"auto vs ref beyond rel {rel} + abs {abs_}: {bad}"
    assert set(CLOSE) - {"contrastive/pos_loss"} <= set(ref), f"metrics missing from the run: {set(CLOSE) - set(ref)}"


def _pin_triton():
    from carft_mega._ext import triton_kernels

    m = triton_kernels("cot_head")
    before = m.autotune_enabled()
    m.set_autotune(False)  # one config per kernel, as in the op tests
    return m, before


def _row(**kw):
    row = {k: 1.0 for k in SAME + CLOSE}
    row.update({"contrastive/neg_count": 4.0, "contrastive/pos_count": 0.0}, **kw)
    return row


def test_comparison_catches_what_it_should():
    """The GPU test's comparison on made-up metric rows: it passes within tolerance and fails on a loss
    beyond it, on different rollouts, on a run without contrastive pairs and on a missing metric."""
    _compare(_row(), _row(loss=1.0 + 1e-3), rel=2e-2, abs_=2e-3)
    with pytest.raises(AssertionError, match="'loss'"):
        _compare(_row(), _row(loss=1.1), rel=2e-2, abs_=2e-3)
    with pytest.raises(AssertionError, match="rollouts differ"):
        _compare(_row(), _row(**{"rollout/gen_len": 2.0}), rel=2e-2, abs_=2e-3)
    with pytest.raises(AssertionError, match="no contrastive pair"):
        _compare(_row(**{"contrastive/neg_count": 0.0}), _row(), rel=2e-2, abs_=2e-3)
    short = _row()
    del short["critic/vf_loss"]
    with pytest.raises(AssertionError, match="missing"):
        _compare(short, short, rel=2e-2, abs_=2e-3)


@pytest.mark.gpu
def test_one_step_fused_matches_reference_gpu(tmp_path, monkeypatch):
    from carft_mega.ops.lcs import extension_available

    pytest.importorskip("megatron.core", reason="megatron-core is not installed (carry its wheel to the GPU)")

    if not extension_available("cuda"):
        pytest.skip("carft_mega_cuda was built without its CUDA part: build it with nvcc and a CUDA torch")
    m, before = _pin_triton()
    try:
        ref, ref_calls = _run(tmp_path, "ref", "ref", "bf16", monkeypatch)
        auto, auto_calls = _run(tmp_path, "auto", "auto", "bf16", monkeypatch)
    finally:
        m.set_autotune(before)
    print(f"kernels=ref: {ref}\nkernels=auto: {auto}\nkernel calls: {auto_calls}")
    assert ref_calls["cot_head"] == ref_calls["advantages"] == 0, ref_calls
    assert auto_calls["cot_head"] and auto_calls["advantages"] and auto_calls["lcs_masks_cuda"], (
        f"kernels=auto did not run every fused op on the GPU: {auto_calls}")
    # bf16 trunk, fp32 head accumulators in both paths: the step-1 losses differ by accumulation order;
    # the second PPO epoch also sees Adam's update of slightly different gradients.
    _compare(ref, auto, rel=2e-2, abs_=2e-3)
