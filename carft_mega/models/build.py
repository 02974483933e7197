"""Building the policy and reference models, and Megatron checkpoints of them.

``build_policy(model_cfg, parallel_cfg, vocab_size)`` needs ``carft_mega.parallel.init_distributed``
first. Sources (``model.source``):

* ``tiny``: a random HF-architecture model generated from ``model.tiny`` with ``model.seed`` and
  converted in memory, so the weights are the same for every TP size;
* ``hf``: an HF directory (safetensors) or a GGUF file, converted in memory (each rank reads the
  full tensors it needs and keeps its TP shard); ``v_head.safetensors`` beside it, if present,
  initialises the CoT head;
* ``mcore``: a dist_checkpointing directory written by ``tools/convert_hf_to_megatron.py`` or
  :func:`save_policy_checkpoint` (``carft_arch.json`` inside describes the architecture).
"""

from __future__ import annotations

import os
from typing import Any

import torch

from carft_mega import parallel
from carft_mega.config import ModelConfig, ParallelConfig
from carft_mega.models import convert
from carft_mega.models.arch import (ArchSpec, arch_from_hf_config, arch_from_tiny, pad_vocab_size,
                                    read_arch_json, write_arch_json)
from carft_mega.models.gpt import (DTYPES, build_gpt_model, build_transformer_config, resolve_dtype,
                                   resolve_transformer_impl)
from carft_mega.models.policy import PolicyModel

TOKENIZER_SUBDIR = "tokenizer"


def make_tiny_hf_model(arch: ArchSpec, seed: int, dtype: torch.dtype = torch.float32):
    """A randomly initialised HF model of ``arch`` (HF's own init, from ``seed``; global RNG untouched)."""
    from transformers import AutoModelForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(arch.to_hf_config(), dtype=dtype, attn_implementation="eager")
    return model.eval()


def build_model_skeleton(arch: ArchSpec, model_cfg: ModelConfig, padded_vocab_size: int) -> PolicyModel:
    """An uninitialised :class:`PolicyModel` laid out for the current parallel state.

    The GPT weights are garbage until loaded; the CoT head is initialised from ``model_cfg.seed``.
    """
    if not parallel.is_initialized():
        raise RuntimeError("call carft_mega.parallel.init_distributed() before building a model")
    tconfig = build_transformer_config(
        arch,
        tp=parallel.tp_size(),
        sequence_parallel=parallel.sequence_parallel(),
        dtype=resolve_dtype(model_cfg.dtype),
        fp8=model_cfg.fp8,
        recompute=model_cfg.recompute_activations,
        transformer_impl=resolve_transformer_impl(model_cfg.transformer_impl),
    )
    gpt = build_gpt_model(arch, tconfig, padded_vocab_size)
    return PolicyModel(gpt, arch, cot_proj_dim=model_cfg.cot_proj_dim, head_seed=model_cfg.seed,
                       kernels=model_cfg.kernels, head_trunk_grad_scale=model_cfg.head_trunk_grad_scale)


def load_v_head_(policy: PolicyModel, v_head: dict[str, torch.Tensor], source: str = convert.V_HEAD_FILE) -> None:
    """Copy a CoT head state dict (``proj.weight`` ...) into ``policy.cot_head``, shapes checked.

    Raises:
        ValueError: a tensor's shape differs from the head's (naming ``model.cot_proj_dim`` and ``source``).
    """
    head = policy.cot_head
    params = dict(head.named_parameters())
    for k, v in v_head.items():
        if k not in params:
            raise KeyError(f"{source}: {k!r} is not a CoT head parameter ({sorted(params)})")
        if tuple(v.shape) != tuple(params[k].shape):
            d, hidden = head.proj.out_features, head.proj.in_features
            raise ValueError(f"{source}: CoT head tensor {k} has shape {tuple(v.shape)}, the policy's head "
                             f"{tuple(params[k].shape)} (config field 'model.cot_proj_dim' = {d}, hidden size "
                             f"{hidden}); set model.cot_proj_dim to the saved head's d")
    with torch.no_grad():
        for k, v in v_head.items():
            params[k].copy_(v)


def policy_from_hf_source(src: convert.HFSource, model_cfg: ModelConfig, padded_vocab_size: int | None = None,
                          v_head: dict[str, torch.Tensor] | None = None,
                          v_head_source: str = convert.V_HEAD_FILE) -> PolicyModel:
    """Build the policy for this rank and load HF weights into it (in-memory conversion).

    Args:
        src: the HF weights and config (its bos/eos/pad ids go to ``policy.hf_token_ids``).
        model_cfg: dtype, spec, CoT head ``d`` and seed.
        padded_vocab_size: embedding rows (default: :func:`pad_vocab_size` at the current TP).
        v_head: a CoT head state dict to load (shapes checked), or None to keep the seeded init.
        v_head_source: where ``v_head`` came from (named in errors).
    """
    arch = arch_from_hf_config(src.config, src.path or "<model>")
    padded = padded_vocab_size or pad_vocab_size(arch.vocab_size, parallel.tp_size())
    policy = build_model_skeleton(arch, model_cfg, padded)
    convert.load_hf_into_gpt(policy.gpt, src, arch, parallel.tp_rank(), parallel.tp_size())
    policy.hf_token_ids = convert.hf_token_ids(src.config)
    if v_head is not None:
        load_v_head_(policy, v_head, v_head_source)
    return policy


def build_policy(model_cfg: ModelConfig, parallel_cfg: ParallelConfig | None = None,
                 vocab_size: int | None = None) -> PolicyModel:
    """The policy (GPT + CoT head) for this rank, on ``parallel.device()``, in train mode.

    Args:
        model_cfg: ``source``, ``path``, ``tiny``, ``dtype``, ``transformer_impl``, ``fp8``,
            ``recompute_activations``, ``cot_proj_dim``, ``seed``.
        parallel_cfg: must agree with the initialised parallel state (checked when given).
        vocab_size: tokenizer size. Required for ``tiny``; for ``hf``/``mcore`` it must not exceed
            the model's vocabulary.

    Raises:
        RuntimeError: ``parallel.init_distributed`` was not called.
        ValueError: inconsistent sizes, naming the field.
    """
    if not parallel.is_initialized():
        raise RuntimeError("call carft_mega.parallel.init_distributed() before build_policy()")
    if parallel_cfg is not None and parallel_cfg.tp != parallel.tp_size():
        raise ValueError(f"config field 'parallel.tp' = {parallel_cfg.tp}: the parallel state was "
                         f"initialised with tp={parallel.tp_size()}")
    if parallel_cfg is not None and parallel_cfg.sequence_parallel != parallel.sequence_parallel():
        raise ValueError(f"config field 'parallel.sequence_parallel' = {parallel_cfg.sequence_parallel}: the "
                         f"parallel state was initialised with sequence_parallel={parallel.sequence_parallel()}")
    if model_cfg.source == "tiny":
        if vocab_size is None:
            raise ValueError("build_policy(source='tiny') needs vocab_size (the tokenizer's size)")
        arch = arch_from_tiny(model_cfg.tiny, vocab_size)
        hf = make_tiny_hf_model(arch, model_cfg.seed)
        policy = policy_from_hf_source(convert.HFSource.from_model(hf), model_cfg)
        policy.hf_token_ids = {}  # transformers' config defaults, not the tokenizer's ids
    elif model_cfg.source == "hf":
        src = convert.HFSource.open(model_cfg.path)
        policy = policy_from_hf_source(src, model_cfg, v_head=convert.read_v_head(model_cfg.path),
                                       v_head_source=convert.v_head_path(model_cfg.path))
    elif model_cfg.source == "mcore":
        policy = load_policy_checkpoint(model_cfg.path, model_cfg)
    else:
        raise ValueError(f"config field 'model.source' = {model_cfg.source!r}: expected tiny, hf or mcore")
    if vocab_size is not None and vocab_size > policy.vocab_size:
        raise ValueError(f"tokenizer vocab_size {vocab_size} exceeds the model's vocabulary "
                         f"{policy.vocab_size} ({model_cfg.source} model at {model_cfg.path})")
    return policy.to(parallel.device()).train()


def frozen_copy(policy: PolicyModel, model_cfg: ModelConfig) -> PolicyModel:
    """A frozen copy of ``policy`` (same layout and weights; eval mode, ``requires_grad_(False)``).

    The RL stage's KL reference: a copy of the policy it starts from (the SFT checkpoint), made
    before any RL update or resume.
    """
    ref = build_model_skeleton(policy.arch, model_cfg, policy.padded_vocab_size)
    ref.load_state_dict(policy.state_dict())
    ref.hf_token_ids = dict(policy.hf_token_ids)
    ref = ref.to(next(policy.parameters()).device)
    ref.requires_grad_(False)
    return ref.eval()


# --------------------------------------------------------------------------------------------
# Megatron checkpoints (model only; the trainer adds the optimizer under its own key)


def checkpoint_info(policy: PolicyModel) -> dict[str, Any]:
    """The ``carft_arch.json`` fields every checkpoint of ``policy`` carries besides the architecture.

    ``cot_proj_dim`` (rebuilds the head), ``dtype`` (the weights' dtype name: the HF export keeps
    it) and ``hf_token_ids`` (the source model's bos/eos/pad ids: the HF export's ``config.json``
    needs them, the transformers defaults are Llama-2's).
    """
    names = {v: k for k, v in DTYPES.items()}
    return {"cot_proj_dim": policy.cot_head.proj.out_features, "dtype": names[policy.config.params_dtype],
            "hf_token_ids": dict(policy.hf_token_ids)}


def save_policy_checkpoint(policy: PolicyModel, ckpt_dir: str | os.PathLike, *,
                           tokenizer_src: str | None = None, extra: dict[str, Any] | None = None) -> None:
    """Save the policy weights as a dist_checkpointing directory plus ``carft_arch.json``.

    Collective over all ranks. The sharded state dict is saved under the top-level key
    ``"model"`` (the trainer saves its optimizer beside it under ``"optimizer"``).

    Args:
        policy: the model (TP-sharded on this rank).
        ckpt_dir: created; must be empty or missing.
        tokenizer_src: HF directory / GGUF file / tokenizer directory copied into
            ``ckpt_dir/tokenizer`` (rank 0).
        extra: extra JSON fields (the source path ...); they override :func:`checkpoint_info`'s.
    """
    from megatron.core import dist_checkpointing

    import torch.distributed as dist

    ckpt_dir = os.fspath(ckpt_dir)
    if dist.get_rank() == 0:
        os.makedirs(ckpt_dir, exist_ok=True)
    dist.barrier()
    dist_checkpointing.save({"model": policy.sharded_state_dict()}, ckpt_dir)
    if dist.get_rank() == 0:
        tok = None
        if tokenizer_src:
            tok = TOKENIZER_SUBDIR if convert.save_tokenizer(tokenizer_src, os.path.join(ckpt_dir, TOKENIZER_SUBDIR)) \
                else None
        write_arch_json(ckpt_dir, policy.arch, policy.padded_vocab_size, tok,
                        {**checkpoint_info(policy), **(extra or {})})
    dist.barrier()


def load_policy_weights(policy: PolicyModel, ckpt_dir: str | os.PathLike, strict: bool = True) -> None:
    """Load a dist_checkpointing directory (saved at any TP) into ``policy``; collective."""
    from megatron.core import dist_checkpointing

    loaded = dist_checkpointing.load({"model": policy.sharded_state_dict()}, os.fspath(ckpt_dir))
    policy.load_state_dict(loaded["model"], strict=strict)


def load_policy_checkpoint(ckpt_dir: str | os.PathLike, model_cfg: ModelConfig) -> PolicyModel:
    """Rebuild the policy from ``carft_arch.json`` and load its weights (any saved TP)."""
    info = read_arch_json(ckpt_dir)
    arch: ArchSpec = info["arch"]
    padded = info["padded_vocab_size"]
    if padded % parallel.tp_size():
        raise ValueError(f"{ckpt_dir}: padded vocabulary {padded} is not divisible by tp={parallel.tp_size()}")
    d = info.get("cot_proj_dim", model_cfg.cot_proj_dim)
    if d != model_cfg.cot_proj_dim:
        raise ValueError(f"config field 'model.cot_proj_dim' = {model_cfg.cot_proj_dim}: checkpoint "
                         f"{ckpt_dir} has a CoT head with d={d}")
    policy = build_model_skeleton(arch, model_cfg, padded)
    load_policy_weights(policy, ckpt_dir)
    policy.hf_token_ids = dict(info.get("hf_token_ids") or {})
    return policy


def tokenizer_dir_of(ckpt_dir: str | os.PathLike) -> str | None:
    """The tokenizer directory saved in a Megatron checkpoint, or None."""
    info = read_arch_json(ckpt_dir)
    tok = info.get("tokenizer")
    if not tok:
        return None
    return tok if os.path.isabs(tok) else os.path.join(os.fspath(ckpt_dir), tok)


def export_hf(policy: PolicyModel, out_dir: str | os.PathLike, *, tokenizer_dir: str | None = None,
              dtype: torch.dtype | None = None, config_extra: dict | None = None) -> None:
    """Write the policy as an HF directory (+ ``v_head.safetensors``); collective over TP.

    Rank 0 of the world writes; other ranks only take part in the TP gather. Without
    ``config_extra`` the config's bos/eos/pad ids are ``policy.hf_token_ids``, else the
    tokenizer's (see ``convert.export_token_ids``).
    """
    import torch.distributed as dist

    full = convert.gather_gpt_state_dict(policy.gpt, policy.arch, policy.tp_group)
    if dist.get_rank() == 0:
        if config_extra is None:
            config_extra = convert.export_token_ids(policy.hf_token_ids, tokenizer_dir)
        hf_sd = convert.megatron_to_hf_state_dict(full, policy.arch)
        convert.save_hf_checkpoint(out_dir, hf_sd, policy.arch, dtype=dtype,
                                   v_head={k: v.detach().cpu() for k, v in policy.cot_head.state_dict().items()},
                                   tokenizer_dir=tokenizer_dir, config_extra=config_extra)
    dist.barrier()


__all__ = ["build_policy", "frozen_copy", "make_tiny_hf_model", "build_model_skeleton",
           "policy_from_hf_source", "load_v_head_", "checkpoint_info", "save_policy_checkpoint",
           "load_policy_weights", "load_policy_checkpoint",
           "tokenizer_dir_of", "export_hf", "TOKENIZER_SUBDIR"]
