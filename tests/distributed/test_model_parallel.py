"""Tensor and data parallelism of the policy on CPU (gloo): two ``torchrun --nproc_per_node 2``
launches of ``mcore_worker.py`` (all TP=2 checks in one, all DP=2 checks in the other), compared
here with the same computation at TP=1 / DP=1 in this process.

What is shown (issue 4 Sec. 3):
* HF -> Megatron -> HF bit-exact and logits within 1e-4 at TP=2 (TP=1: tests/models);
* TP=2 (with and without sequence parallelism) gives the TP=1 log-probs, values, pooled
  embeddings, entropy and gradients; the CoT head's gradients are identical on both TP ranks;
* DP=2 x 2 micro-batches through Megatron DDP + finalize_model_grads gives the DP=1 gradients;
* vocab-parallel log-probs / entropy against a full-vocabulary log_softmax;
* dist_checkpointing: saved at TP=2, loaded at TP=1 bit-exactly; model + DistributedOptimizer
  round trips at TP=2 and DP=2;
* KV-cache decoding at TP=2; the conversion tools' functions at TP=2.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from tests.models.mcore_helpers import (assert_fp32_close, forward_backward, policy_inputs, random_head_, tiny_arch,
                                        tiny_hf_model, tp1, wrap_ddp)  # noqa: F401  (tp1 is a fixture)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WORKER = os.path.join(ROOT, "tests", "distributed", "mcore_worker.py")

TP2_CHECKS = [
    "tp2_roundtrip_llama_tied_gqa", "tp2_logits_llama_tied_gqa", "tp2_roundtrip_llama_untied_mha",
    "tp2_logits_llama_untied_mha", "tp2_roundtrip_qwen2_tied_gqa", "tp2_logits_qwen2_tied_gqa",
    "tp2_roundtrip_qwen2_untied_gqa", "tp2_logits_qwen2_untied_gqa", "tp2_head_grads_identical_across_tp",
    "tp2_norm_grads_identical_across_tp", "tp2_vocab_parallel_logprobs_N37_V1000",
    "tp2_vocab_parallel_logprobs_N5_V129", "tp2_vocab_parallel_logprobs_N1_V250",
    "tp2_vocab_parallel_logprobs_N3_V100", "tp2_kv_cache_decode",
    "tp2_model_checkpoint_saved", "tp2_distopt_step", "tp2_model_opt_reload_model_bitexact",
    "tp2_model_opt_reload_optimizer_state_bitexact",
    "tp2_step_after_reload_bitexact", "tp2_compare_logits", "tp2_export_written",
    "tp2sp_head_grads_identical_across_tp", "tp2sp_norm_grads_identical_across_tp",
    "tp2_python_scoring_once_per_group",
]
DP2_CHECKS = ["dp2_layout", "dp2_grads_identical_across_dp", "dp2_params_identical_after_steps",
              "dp2_reload_model_bitexact", "dp2_reload_optimizer_bitexact", "dp2_step_after_reload_bitexact"]


def launch(mode: str, workdir: str) -> str:
    """Run the worker on 2 ranks; a failing rank fails the test with the launch's output."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           WORKER, mode, workdir]
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"torchrun {mode} timed out after 600 s\n{(e.stdout or '')[-6000:]}\n{(e.stderr or '')[-6000:]}")
    out = proc.stdout + "\n" + proc.stderr
    if proc.returncode != 0:
        pytest.fail(f"torchrun {mode} failed (exit {proc.returncode}):\n{out[-12000:]}")
    return out


@pytest.fixture(scope="module")
def tp2_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("tp2"))
    tiny_hf_model(tiny_arch("qwen2", tied=False), seed=3).save_pretrained(os.path.join(workdir, "hf_src"))
    return workdir, launch("tp2", workdir)


@pytest.fixture(scope="module")
def dp2_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("dp2"))
    return workdir, launch("dp2", workdir)


def _build_tp1(arch, seed):
    from carft_mega.models.build import policy_from_hf_source
    from carft_mega.models.convert import HFSource
    from tests.models.mcore_helpers import model_cfg

    hf = tiny_hf_model(arch, seed)
    return policy_from_hf_source(HFSource.from_model(hf), model_cfg())


def test_tp2_worker_checks(tp2_run):
    _, out = tp2_run
    missing = [c for c in TP2_CHECKS if f"CHECK {c} ok" not in out]
    assert not missing, f"checks not reported: {missing}\n{out[-4000:]}"


def test_dp2_worker_checks(dp2_run):
    _, out = dp2_run
    missing = [c for c in DP2_CHECKS if f"CHECK {c} ok" not in out]
    assert not missing, f"checks not reported: {missing}\n{out[-4000:]}"


@pytest.fixture(scope="module")
def tp1_reference(tp1):
    """The worker's tp_forward_backward at TP=1 in this process."""
    pol = _build_tp1(tiny_arch("qwen2", tied=False), seed=3)
    random_head_(pol)
    ddp, _ = wrap_ddp(pol, lr=0)
    return forward_backward(pol, ddp, *policy_inputs(seed=1))


@pytest.mark.parametrize("tag", ["tp2", "tp2sp"])
def test_tp2_matches_tp1(tp2_run, tp1_reference, tag):
    workdir, _ = tp2_run
    got = torch.load(os.path.join(workdir, f"{tag}.pt"))
    outs, grads, head = tp1_reference
    _, mask, _, _ = policy_inputs(seed=1)
    for k in ("logp", "values", "entropy"):
        assert_fp32_close(f"{tag} {k}", got["outs"][k][mask], outs[k][mask])
    assert_fp32_close(f"{tag} z", got["outs"]["z"], outs["z"])
    assert torch.equal(got["outs"]["z_valid"], outs["z_valid"])
    assert set(got["grads"]) == set(grads)
    for k in grads:
        assert_fp32_close(f"{tag} grad {k}", got["grads"][k], grads[k])
    for k in head:
        assert_fp32_close(f"{tag} head grad {k}", got["head"][k], head[k])


def test_checkpoint_saved_at_tp2_loads_at_tp1_bitexact(tp2_run, tp1):
    from carft_mega.models.build import load_policy_checkpoint
    from tests.models.mcore_helpers import model_cfg

    workdir, _ = tp2_run
    path = os.path.join(workdir, "ckpt_tp2")
    loaded = load_policy_checkpoint(path, model_cfg(source="mcore", path=path))
    fresh = _build_tp1(tiny_arch("qwen2", tied=False), seed=21)  # what the worker converted at TP=2
    ref = fresh.gpt.state_dict()
    for k, v in loaded.gpt.state_dict().items():
        if torch.is_tensor(v) and not k.endswith("_extra_state"):
            assert torch.equal(v, ref[k]), k
    head = torch.load(os.path.join(workdir, "head_tp2.pt"))
    for k, v in loaded.cot_head.state_dict().items():
        assert torch.equal(v, head[k]), k


def test_tools_at_tp2_export_bitexact(tp2_run):
    from safetensors.torch import load_file

    workdir, _ = tp2_run
    src = load_file(os.path.join(workdir, "hf_src", "model.safetensors"))
    back = load_file(os.path.join(workdir, "hf_back_tp2", "model.safetensors"))
    assert set(src) == set(back)
    for k in src:
        assert torch.equal(src[k], back[k]), k
    assert os.path.exists(os.path.join(workdir, "hf_back_tp2", "v_head.safetensors"))


def test_dp2_microbatches_match_dp1_full_batch(dp2_run, tp1):
    """DP=1, one micro-batch of all 8 rows, loss = sum / (global real tokens)."""
    from carft_mega.models.convert import gather_gpt_state_dict

    workdir, _ = dp2_run
    got = torch.load(os.path.join(workdir, "dp2.pt"))
    arch = tiny_arch("llama", tied=True)
    pol = _build_tp1(arch, seed=5)
    random_head_(pol)
    ddp, _ = wrap_ddp(pol, lr=0)
    tokens, mask, spans, w = policy_inputs(seed=7, B=8, K=3)
    ddp.zero_grad_buffer()
    out = ddp(tokens, attention_mask=mask, span_masks=spans, need_entropy=True)
    m = mask.float()
    loss = ((out.logp * w["logp"] * m).sum() + (out.values * w["values"] * m).sum()
            + (out.entropy * w["entropy"] * m).sum()) / m.sum()
    loss.backward()
    from megatron.core.distributed import finalize_model_grads

    finalize_model_grads([ddp])
    grads = gather_gpt_state_dict(pol.gpt, arch, pol.tp_group, tensor_fn=lambda p: p.main_grad)
    for k in grads:
        assert_fp32_close(f"dp grad {k}", got["grads"][k], grads[k])
    for k, p in pol.cot_head.named_parameters():
        assert_fp32_close(f"dp head grad {k}", got["head"][k], p.main_grad)
