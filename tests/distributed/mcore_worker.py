"""torchrun worker for tests/distributed/test_model_parallel.py (2 ranks, gloo, CPU).

    torchrun --nproc_per_node 2 tests/distributed/mcore_worker.py {tp2|dp2} WORKDIR

Each check prints ``CHECK <name> ok``; a failed assertion raises, which makes torchrun exit
non-zero and the test print this rank's output. Tensors that pytest compares against its own
in-process TP=1 / DP=1 run are written to ``WORKDIR/*.pt`` by rank 0.
"""

from __future__ import annotations

import os
import sys
import time

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, _ROOT)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from carft_mega import parallel  # noqa: E402
from carft_mega.config import ParallelConfig  # noqa: E402

_T0 = time.time()


def check(name: str, cond: bool, detail: str = "") -> None:
    if not cond:
        raise AssertionError(f"rank {dist.get_rank()}: check {name} failed: {detail}")
    if dist.get_rank() == 0:
        print(f"CHECK {name} ok {detail} [{time.time() - _T0:.1f}s]", flush=True)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item() if a.numel() else 0.0


def build(arch, seed: int, **cfg):
    from carft_mega.models.build import policy_from_hf_source
    from carft_mega.models.convert import HFSource
    from tests.models.mcore_helpers import model_cfg, tiny_hf_model

    hf = tiny_hf_model(arch, seed)
    return hf, policy_from_hf_source(HFSource.from_model(hf), model_cfg(**cfg))


# --------------------------------------------------------------------------------------------
# TP = 2


def tp2_conversion() -> None:
    """HF -> Megatron (TP shards) -> HF is bit-exact; Megatron logits match HF (fp32)."""
    from carft_mega.models.convert import gather_gpt_state_dict, megatron_to_hf_state_dict
    from tests.models.mcore_helpers import CONVERSION_CASES, policy_inputs, tiny_arch

    for i, (name, kw) in enumerate(CONVERSION_CASES):
        arch = tiny_arch(**kw)
        hf, pol = build(arch, seed=10 + i)
        back = megatron_to_hf_state_dict(gather_gpt_state_dict(pol.gpt, arch, parallel.tp_group()), arch)
        ref = {k: v for k, v in hf.state_dict().items() if not (arch.tie_embeddings and k == "lm_head.weight")}
        check(f"tp2_roundtrip_{name}", set(back) == set(ref) and all(torch.equal(back[k], ref[k]) for k in ref),
              f"keys {sorted(set(back) ^ set(ref))}")
        tokens, mask, _, _ = policy_inputs(seed=i)
        with torch.no_grad():
            meg = pol.lm_logits(pol.trunk(tokens), gather=True).transpose(0, 1)[..., :arch.vocab_size]
            want = hf(tokens).logits
        d = max_diff(meg, want)
        check(f"tp2_logits_{name}", d <= 1e-4, f"max|dlogit|={d:.2e}")


def tp_forward_backward(tag: str, workdir: str) -> None:
    """Outputs and gradients through Megatron DDP at the current TP (compared with TP=1 by pytest)."""
    from tests.models.mcore_helpers import forward_backward, policy_inputs, random_head_, tiny_arch, wrap_ddp

    arch = tiny_arch("qwen2", tied=False)
    _, pol = build(arch, seed=3)
    random_head_(pol)
    ddp, _ = wrap_ddp(pol, lr=0)
    tokens, mask, spans, weights = policy_inputs(seed=1)
    outs, grads, head = forward_backward(pol, ddp, tokens, mask, spans, weights)
    # The replicated head must end with bit-identical gradients on every TP rank.
    flat = torch.cat([g.flatten() for g in head.values()])
    gathered = [torch.empty_like(flat) for _ in range(parallel.tp_size())]
    dist.all_gather(gathered, flat, group=parallel.tp_group())
    check(f"{tag}_head_grads_identical_across_tp", all(torch.equal(g, gathered[0]) for g in gathered))
    # And so must the replicated norm weights' gradients (SP: summed over TP by finalize_model_grads).
    norm = torch.cat([grads[k].flatten() for k in grads if k.endswith("layernorm.weight")])
    gathered = [torch.empty_like(norm) for _ in range(parallel.tp_size())]
    dist.all_gather(gathered, norm, group=parallel.tp_group())
    check(f"{tag}_norm_grads_identical_across_tp", all(torch.equal(g, gathered[0]) for g in gathered))
    if dist.get_rank() == 0:
        torch.save({"outs": outs, "grads": grads, "head": head}, os.path.join(workdir, f"{tag}.pt"))
    check(f"{tag}_saved", True)


def tp2_vocab_parallel() -> None:
    """Vocab-parallel logp/entropy (+ grads) against a full-vocabulary log_softmax, with padding columns."""
    from carft_mega.models.logprobs import full_vocab_logprobs_ref, vocab_parallel_logprobs

    g = torch.Generator().manual_seed(4)
    for (N, vocab, padded) in [(37, 1000, 1024), (5, 129, 256), (1, 250, 256), (3, 100, 256)]:
        logits = torch.randn(N, padded, generator=g) * 3
        logits[:, vocab:] = 50.0  # padding columns would dominate if they were not excluded
        target = torch.randint(0, vocab, (N,), generator=g)
        gl, ge = torch.randn(N, generator=g), torch.randn(N, generator=g)
        full = logits.clone().requires_grad_(True)
        lp_ref, ent_ref = full_vocab_logprobs_ref(full, target, vocab, need_entropy=True)
        (gfull,) = torch.autograd.grad((lp_ref * gl).sum() + (ent_ref * ge).sum(), full)
        r, n = parallel.tp_rank(), padded // parallel.tp_size()
        local = logits[:, r * n:(r + 1) * n].clone().requires_grad_(True)
        lp, ent = vocab_parallel_logprobs(local, target, tp_group=parallel.tp_group(), vocab_start=r * n,
                                          vocab_size=vocab, need_entropy=True)
        (glocal,) = torch.autograd.grad((lp * gl).sum() + (ent * ge).sum(), local)
        d = max(max_diff(lp, lp_ref), max_diff(ent, ent_ref), max_diff(glocal, gfull[:, r * n:(r + 1) * n]))
        check(f"tp2_vocab_parallel_logprobs_N{N}_V{vocab}", d <= 1e-5, f"max diff {d:.2e}")


def tp2_kv_cache() -> None:
    """Static-batching KV-cache decoding of left-padded rows equals the full forward at TP=2."""
    from megatron.core.inference.contexts import StaticInferenceContext

    from carft_mega.models.policy import build_attention_mask, left_pad_position_ids
    from tests.models.mcore_helpers import policy_inputs, tiny_arch

    arch = tiny_arch("llama", tied=True)
    _, pol = build(arch, seed=8)
    pol.eval()
    tokens, mask, _, _ = policy_inputs(seed=2)
    mask[3, :9] = False  # row 3: 4 real tokens
    P = 9
    pos = left_pad_position_ids(mask)
    with torch.no_grad():
        full = pol.lm_logits(pol.trunk(tokens, position_ids=pos, attention_mask=build_attention_mask(mask)),
                             gather=True)  # (T, B, V)
        ctx = StaticInferenceContext(tokens.shape[0], tokens.shape[1])
        h = pol.trunk(tokens[:, :P], attention_mask=build_attention_mask(mask[:, :P]), inference_context=ctx,
                      rotary_position_ids=pos)
        steps = [pol.lm_logits(h[-1:], gather=True)[0]]
        ctx.sequence_len_offset += P
        for t in range(P, tokens.shape[1] - 1):
            h = pol.trunk(tokens[:, t:t + 1], attention_mask=build_attention_mask(mask[:, :t + 1], q_len=1),
                          inference_context=ctx, rotary_position_ids=pos)
            steps.append(pol.lm_logits(h[-1:], gather=True)[0])
            ctx.sequence_len_offset += 1
    d = max_diff(torch.stack(steps), full[P - 1:-1])
    check("tp2_kv_cache_decode", d <= 1e-5, f"max|dlogit|={d:.2e}")


def tp2_checkpoints(workdir: str) -> None:
    """dist_checkpointing: model saved at TP2 (pytest loads it at TP1); model+DistributedOptimizer round trip."""
    from megatron.core import dist_checkpointing

    from carft_mega.models.build import save_policy_checkpoint
    from carft_mega.models.megatron_compat import (OPTIMIZER_SHARDING_METADATA, finish_optimizer_load,
                                                   prepare_optimizer_for_load)
    from tests.models.mcore_helpers import policy_inputs, random_head_, tiny_arch, wrap_ddp

    arch = tiny_arch("qwen2", tied=False)
    _, pol = build(arch, seed=21)
    random_head_(pol, seed=9)
    save_policy_checkpoint(pol, os.path.join(workdir, "ckpt_tp2"))
    if dist.get_rank() == 0:
        torch.save({k: v.cpu() for k, v in pol.cot_head.state_dict().items()}, os.path.join(workdir, "head_tp2.pt"))
    check("tp2_model_checkpoint_saved", True)

    # One optimizer step with DDP + DistributedOptimizer + grad clipping, save, load into fresh ones.
    ddp, opt = wrap_ddp(pol, distributed_optimizer=True)
    tokens, mask, spans, weights = policy_inputs(seed=3)
    from tests.models.mcore_helpers import forward_backward

    forward_backward(pol, ddp, tokens, mask, spans, weights)
    ok, grad_norm, _ = opt.step()
    check("tp2_distopt_step", ok and grad_norm > 0, f"grad_norm={grad_norm:.3f}")
    path = os.path.join(workdir, "ckpt_tp2_opt")
    if dist.get_rank() == 0:
        os.makedirs(path)
    dist.barrier()
    msd = pol.sharded_state_dict()
    dist_checkpointing.save({"model": msd, "optimizer": opt.sharded_state_dict(
        msd, metadata=OPTIMIZER_SHARDING_METADATA)}, path)
    _, pol2 = build(arch, seed=99)  # different weights, overwritten by the load
    ddp2, opt2 = wrap_ddp(pol2, distributed_optimizer=True)
    prepare_optimizer_for_load(opt2)
    msd2 = pol2.sharded_state_dict()
    loaded = dist_checkpointing.load({"model": msd2, "optimizer": opt2.sharded_state_dict(
        msd2, is_loading=True, metadata=OPTIMIZER_SHARDING_METADATA)}, path)
    pol2.load_state_dict(loaded["model"])
    opt2.load_state_dict(loaded["optimizer"])
    finish_optimizer_load(opt2)
    same = all(torch.equal(a, b) for a, b in zip(pol.state_dict().values(), pol2.state_dict().values())
               if torch.is_tensor(a))
    check("tp2_model_opt_reload_model_bitexact", same)
    s1 = [st for o in opt.chained_optimizers for st in o.optimizer.state.values()]
    s2 = [st for o in opt2.chained_optimizers for st in o.optimizer.state.values()]
    same = len(s1) == len(s2) and all(set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
                                      for a, b in zip(s1, s2))
    check("tp2_model_opt_reload_optimizer_state_bitexact", same,
          f"step={s2[0]['step'].item() if s2 else None}, {len(s1)} tensors")
    # The next update after the reload is the update without it (catches a shared Adam step).
    for p_, d_, o_ in ((pol, ddp, opt), (pol2, ddp2, opt2)):
        forward_backward(p_, d_, tokens, mask, spans, weights)
        o_.step()
    check("tp2_step_after_reload_bitexact",
          all(torch.equal(a, b) for a, b in zip(pol.parameters(), pol2.parameters())))


def tp2_tools(workdir: str) -> None:
    """The tools' package functions at TP=2 (the CLIs wrap exactly these)."""
    from carft_mega.models.pipelines import compare_logits, convert_hf_to_megatron, convert_megatron_to_hf

    src = os.path.join(workdir, "hf_src")
    out = os.path.join(workdir, "tool_ckpt_tp2")
    convert_hf_to_megatron(src, out)
    res = compare_logits(src, out)
    check("tp2_compare_logits", res["kl_max"] < 1e-6, str(res))
    convert_megatron_to_hf(out, os.path.join(workdir, "hf_back_tp2"))
    check("tp2_export_written", True)


def tp2_python_scoring() -> None:
    """Model-written programs run once per TP group (its first rank) and every rank gets those answers."""
    from types import SimpleNamespace

    from carft_mega.reward.sandbox import Sandbox
    from carft_mega.trainer.evaluate import extract_answers_tp

    class Refuses:
        def run_programs(self, *_):
            raise AssertionError("a program ran on a TP rank other than the first")

    programs = ["def solution():\n    import time\n    return time.perf_counter_ns() % 1000003\n",
                "def solution():\n    return 6 * 7\n", "def solution():\n    return 1 / 0\n"]
    first = parallel.tp_rank() == 0
    sandbox = Sandbox(workers=1, timeout=5.0) if first else Refuses()
    run = SimpleNamespace(cfg=SimpleNamespace(data=SimpleNamespace(style="python")), sandbox=sandbox)
    try:
        preds = extract_answers_tp(run, programs)
    finally:
        if first:
            sandbox.close()
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, preds)
    check("tp2_python_scoring_once_per_group",
          everyone[0] == everyone[1] and preds[1] == 42.0 and preds[2] is None, str(everyone))


def run_tp2(workdir: str) -> None:
    parallel.init_distributed(ParallelConfig(tp=2), seed=0)
    tp2_python_scoring()
    tp2_conversion()
    tp_forward_backward("tp2", workdir)
    tp2_vocab_parallel()
    tp2_kv_cache()
    tp2_checkpoints(workdir)
    tp2_tools(workdir)
    parallel.destroy(keep_process_group=True)
    parallel.init_distributed(ParallelConfig(tp=2, sequence_parallel=True), seed=0)
    tp_forward_backward("tp2sp", workdir)  # T = 13 is odd: exercises the SP right-padding
    parallel.destroy()


# --------------------------------------------------------------------------------------------
# DP = 2


def dp2_microbatches(workdir: str) -> None:
    """DP=2 x 2 micro-batches through Megatron's schedule + DDP + finalize_model_grads (per-token loss)."""
    from megatron.core.pipeline_parallel.schedules import forward_backward_no_pipelining

    from carft_mega.models.convert import gather_gpt_state_dict
    from tests.models.mcore_helpers import policy_inputs, random_head_, tiny_arch, wrap_ddp

    arch = tiny_arch("llama", tied=True)
    _, pol = build(arch, seed=5)
    random_head_(pol)
    pol.config.calculate_per_token_loss = True  # before DDP: grads are summed, then / global tokens
    ddp, _ = wrap_ddp(pol, lr=0)
    tokens, mask, spans, weights = policy_inputs(seed=7, B=8, K=3)
    r = parallel.dp_rank()
    rows = slice(4 * r, 4 * r + 4)
    micro = [(tokens[rows][i:i + 2], mask[rows][i:i + 2], spans[:, rows][:, i:i + 2],
              {k: (v[rows][i:i + 2] if k != "z" else v[:, rows][:, i:i + 2]) for k, v in weights.items()})
             for i in (0, 2)]

    def step(it, model):
        tk, mk, sp, w = next(it)
        out = model(tk, attention_mask=mk, span_masks=sp, need_entropy=True)

        def loss_func(_):
            m = mk.float()
            total = ((out.logp * w["logp"] * m).sum() + (out.values * w["values"] * m).sum()
                     + (out.entropy * w["entropy"] * m).sum())
            return total, mk.sum().to(torch.int), {}

        return out.values, loss_func

    ddp.zero_grad_buffer()
    forward_backward_no_pipelining(forward_step_func=step, data_iterator=iter(micro), model=ddp, num_microbatches=2,
                                   seq_length=tokens.shape[1], micro_batch_size=2, forward_only=False)
    grads = gather_gpt_state_dict(pol.gpt, arch, parallel.tp_group(), tensor_fn=lambda p: p.main_grad)
    head = {k: p.main_grad.detach().clone() for k, p in pol.cot_head.named_parameters()}
    flat = torch.cat([g.flatten() for g in list(grads.values()) + list(head.values())])
    other = [torch.empty_like(flat) for _ in range(2)]
    dist.all_gather(other, flat)
    check("dp2_grads_identical_across_dp", torch.equal(other[0], other[1]))
    if dist.get_rank() == 0:
        torch.save({"grads": grads, "head": head}, os.path.join(workdir, "dp2.pt"))


def dp2_distopt_checkpoint(workdir: str) -> None:
    """DistributedOptimizer at DP=2 (state sharded over DP): step, save, reload bit-exact incl. step."""
    from megatron.core import dist_checkpointing

    from carft_mega.models.megatron_compat import (OPTIMIZER_SHARDING_METADATA, finish_optimizer_load,
                                                   prepare_optimizer_for_load)
    from tests.models.mcore_helpers import forward_backward, policy_inputs, tiny_arch, wrap_ddp

    arch = tiny_arch("qwen2", tied=True)
    _, pol = build(arch, seed=6)
    ddp, opt = wrap_ddp(pol, distributed_optimizer=True)
    tokens, mask, spans, weights = policy_inputs(seed=10 + parallel.dp_rank())
    for _ in range(2):
        forward_backward(pol, ddp, tokens, mask, spans, weights)
        ok, _, _ = opt.step()
    params = torch.cat([p.detach().flatten() for p in pol.parameters()])
    other = [torch.empty_like(params) for _ in range(2)]
    dist.all_gather(other, params)
    check("dp2_params_identical_after_steps", ok and torch.equal(other[0], other[1]))
    path = os.path.join(workdir, "ckpt_dp2_opt")
    if dist.get_rank() == 0:
        os.makedirs(path)
    dist.barrier()
    msd = pol.sharded_state_dict()
    dist_checkpointing.save({"model": msd, "optimizer": opt.sharded_state_dict(
        msd, metadata=OPTIMIZER_SHARDING_METADATA)}, path)
    _, pol2 = build(arch, seed=98)
    ddp2, opt2 = wrap_ddp(pol2, distributed_optimizer=True)
    prepare_optimizer_for_load(opt2)
    msd2 = pol2.sharded_state_dict()
    loaded = dist_checkpointing.load({"model": msd2, "optimizer": opt2.sharded_state_dict(
        msd2, is_loading=True, metadata=OPTIMIZER_SHARDING_METADATA)}, path)
    pol2.load_state_dict(loaded["model"])
    opt2.load_state_dict(loaded["optimizer"])
    finish_optimizer_load(opt2)
    check("dp2_reload_model_bitexact", all(torch.equal(a, b) for a, b in zip(pol.parameters(), pol2.parameters())))
    s1 = [st for o in opt.chained_optimizers for st in o.optimizer.state.values()]
    s2 = [st for o in opt2.chained_optimizers for st in o.optimizer.state.values()]
    check("dp2_reload_optimizer_bitexact",
          len(s1) == len(s2) and all(all(torch.equal(a[k], b[k]) for k in a) for a, b in zip(s1, s2)),
          f"step={s2[0]['step'].item() if s2 else None}")
    for p_, d_, o_ in ((pol, ddp, opt), (pol2, ddp2, opt2)):
        forward_backward(p_, d_, tokens, mask, spans, weights)
        o_.step()
    check("dp2_step_after_reload_bitexact",
          all(torch.equal(a, b) for a, b in zip(pol.parameters(), pol2.parameters())))


def run_dp2(workdir: str) -> None:
    parallel.init_distributed(ParallelConfig(tp=1), seed=0)
    check("dp2_layout", parallel.dp_size() == 2 and parallel.tp_size() == 1)
    dp2_microbatches(workdir)
    dp2_distopt_checkpoint(workdir)
    parallel.destroy()


if __name__ == "__main__":  # guard required: dist_checkpointing's async writer re-imports __main__
    mode, workdir = sys.argv[1], sys.argv[2]
    {"tp2": run_tp2, "dp2": run_dp2}[mode](workdir)
    print(f"WORKER {mode} rank done in {time.time() - _T0:.1f}s", flush=True)
