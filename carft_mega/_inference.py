"""What ``python -m carft_mega.evaluate`` and ``python -m carft_mega.generate`` share: turn a
``--model`` path into a config, a tokenizer and a policy.

``--model`` is an HF directory, a GGUF file, a carft_mega checkpoint (``carft_arch.json``: a
trainer checkpoint or one from tools/convert_hf_to_megatron.py), or a run directory (its latest
checkpoint). A trainer checkpoint carries the config it was trained with: its data, prompt and
evaluation settings are the defaults (the run's own test set, the same prompts), each flag
overrides them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from types import SimpleNamespace

from carft_mega.config import TrainerConfig, apply_overrides, from_dict

TRAINER_STATE = "trainer_state.json"


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True,
                   help="HF directory, .gguf file, carft_mega checkpoint, or a run directory (its latest checkpoint)")
    p.add_argument("--tokenizer", help="tokenizer directory / .gguf / 'char' (default: the model's)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size (world size = tp x dp under torchrun)")
    p.add_argument("--dtype", default=None, choices=["auto", "bf16", "fp32"], help="compute dtype (default auto)")
    p.add_argument("--style", choices=["nl", "python"], help="CoT style of the prompts (default: the run's, else nl)")
    p.add_argument("--max-prompt-tokens", type=int, help="prompt truncation (default: the run's, else 300)")
    p.add_argument("--max-new-tokens", type=int, help="generation limit (default: the run's eval limit, else 700)")
    p.add_argument("--batch-size", type=int, help="prompts per generation batch on one rank (default 32)")


def resolve_model(path: str) -> tuple[str, str, dict | None]:
    """``(model.source, model.path, the trainer config or None)`` of a ``--model`` path."""
    if not os.path.exists(path):
        raise SystemExit(f"error: --model {path}: no such file or directory")
    latest = os.path.join(path, "checkpoints", "latest")
    if os.path.isdir(path) and os.path.isfile(latest):  # a run directory
        with open(latest) as f:
            path = os.path.join(path, "checkpoints", f.read().strip())
        print(f"--model: the run's latest checkpoint, {path}", file=sys.stderr, flush=True)
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, "carft_arch.json")):
        saved = None
        if os.path.isfile(os.path.join(path, TRAINER_STATE)):
            with open(os.path.join(path, TRAINER_STATE)) as f:
                saved = json.load(f).get("config")
        return "mcore", path, saved
    return "hf", path, None


def build_config(args, extra: list[str]) -> TrainerConfig:
    """The config of an inference command: the run's (for a trainer checkpoint) or the defaults,
    with the model, the parallel layout and the flags applied."""
    source, path, saved = resolve_model(args.model)
    cfg = from_dict(TrainerConfig, saved) if saved else TrainerConfig()
    over = [f"model.source={source}", f"model.path={path}", f"parallel.tp={args.tp}",
            "ppo.enabled=false", "sft.enabled=true",  # no training: whatever the run's stage settings were
            "rollout.top_k=0", "rollout.top_p=1.0"]
    tok = args.tokenizer
    if tok is None and source == "mcore" and saved and saved["model"].get("tokenizer"):
        with open(os.path.join(path, "carft_arch.json")) as f:
            if not json.load(f).get("tokenizer"):  # an older checkpoint without its tokenizer
                tok = saved["model"]["tokenizer"]
    over.append(f"model.tokenizer={tok}" if tok else "model.tokenizer=null")
    for flag, field in (("dtype", "model.dtype"), ("style", "data.style"),
                        ("max_prompt_tokens", "data.max_prompt_tokens"),
                        ("max_new_tokens", "rollout.eval_max_new_tokens"), ("batch_size", "rollout.eval_batch_size")):
        value = getattr(args, flag, None)
        if value is not None:
            over.append(f"{field}={value}")
    over += extra
    cfg = apply_overrides(cfg, over)
    if cfg.data.max_prompt_tokens + cfg.rollout.eval_max_new_tokens > cfg.data.max_length:
        cfg = apply_overrides(cfg, [f"data.max_length={cfg.data.max_prompt_tokens + cfg.rollout.eval_max_new_tokens}"])
    return cfg


def open_model(cfg: TrainerConfig):
    """Initialise distributed state and load ``(tokenizer, policy, context)``; collective.

    ``context`` has what ``trainer.evaluate`` reads from a ``Run``: ``cfg``, ``tokenizer``,
    ``device``, ``sandbox`` (python style). Errors are :class:`RunError` (one line).
    """
    from carft_mega import parallel
    from carft_mega.models.build import build_policy
    from carft_mega.trainer.context import _load_tokenizer, _on_rank0, tokenizer_source
    from carft_mega.trainer.preflight import RunError, check_model

    try:
        parallel.init_distributed(cfg.parallel, seed=cfg.seed)
    except ValueError as e:
        raise RunError(str(e).replace("config field 'parallel.tp'", "--tp")) from None
    try:
        _on_rank0(lambda: check_model(cfg))
    except RunError as e:
        raise RunError(str(e).replace("config field 'parallel.tp'", "--tp").replace("config field 'model.path'",
                                                                                      "--model")) from None
    tokenizer = _load_tokenizer(cfg, tokenizer_source(cfg))
    policy = build_policy(cfg.model, cfg.parallel, vocab_size=tokenizer.vocab_size).eval()
    sandbox = None
    if cfg.data.style == "python" and parallel.tp_rank() == 0:
        from carft_mega.reward.sandbox import Sandbox
        sandbox = Sandbox.from_config(cfg.reward)
    return tokenizer, policy, SimpleNamespace(cfg=cfg, tokenizer=tokenizer, device=parallel.device(), sandbox=sandbox)


def close(ctx) -> None:
    from carft_mega import parallel

    if ctx is not None and ctx.sandbox is not None:
        ctx.sandbox.close()
    parallel.destroy()
