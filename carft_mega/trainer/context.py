"""What every stage shares: the run context (config, tokenizer, data, logger, checkpoints), the
deterministic data order, and step counts.

Data order is a pure function of (seed, step): epoch ``e`` is a seeded permutation of the
training set, and step ``s`` of a stage takes the next global batch from the stream of epochs,
rank ``r`` its ``r``-th slice. RL batches never straddle two epochs (no prompt twice in a batch).
The step counter is the data cursor.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from carft_mega import parallel
from carft_mega.config import TrainerConfig, format_config, save_config
from carft_mega.trainer.checkpoint import CheckpointManager
from carft_mega.trainer.metrics import MetricsLogger


class TrainingStopped(RuntimeError):
    """Raised when a run must stop (too many consecutive non-finite losses)."""


@dataclass
class Run:
    """Everything a stage needs besides its engine.

    Attributes:
        cfg: the resolved configuration.
        tokenizer: a ``carft_mega.data.tokenizers.Tokenizer``.
        tokenizer_dir: directory saved into checkpoints (None for the character tokenizer).
        train, test: records.
        logger: rank-0 metrics logger (no-op elsewhere).
        ckpts: checkpoint manager under ``<out_dir>/checkpoints``.
        sandbox: pool for python-style answers (None for nl).
        device: this rank's device.
        results: accuracies gathered along the run (returned by ``run_training``).
    """

    cfg: TrainerConfig
    tokenizer: Any
    tokenizer_dir: str | None
    train: list
    test: list
    logger: MetricsLogger
    ckpts: CheckpointManager
    sandbox: Any
    device: torch.device
    results: dict[str, Any] = field(default_factory=dict)

    @property
    def is_main(self) -> bool:
        return dist.get_rank() == 0

    def print(self, text: str) -> None:
        """Rank-0 console line (through the progress bar when one is open)."""
        if self.is_main:
            self.logger.write(text) if self.logger.enabled else print(text, flush=True)

    def local_indices(self, step: int, global_batch: int, salt: int, drop_last: bool = False) -> list[int]:
        """This DP rank's training-record indices for ``step`` (see module docstring).

        Args:
            step: 0-based step of the stage.
            global_batch: records per step over all DP ranks (a multiple of the DP size).
            salt: separates the data streams of the two stages.
            drop_last: batches never straddle two epochs, so no record appears twice in one batch
                (RL: a repeated question would be its own false negative in the contrastive bank);
                the last ``n mod global_batch`` records of each epoch's shuffle are left out.
        """
        n = len(self.train)
        if drop_last:
            if n < global_batch:
                raise ValueError(f"a batch of {global_batch} records needs at least that many training records (have {n})")
            epoch, j = divmod(step, n // global_batch)
            out = _epoch_order(n, self.cfg.seed + salt, epoch)[j * global_batch:(j + 1) * global_batch].tolist()
        else:
            start = step * global_batch
            out = []
            for k in range(start, start + global_batch):
                epoch, pos = divmod(k, n)
                out.append(int(_epoch_order(n, self.cfg.seed + salt, epoch)[pos]))
        per_rank = global_batch // parallel.dp_size()
        r = parallel.dp_rank()
        return out[r * per_rank:(r + 1) * per_rank]


_ORDER_CACHE: dict[tuple[int, int, int], torch.Tensor] = {}


def _epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    key = (n, seed, epoch)
    if key not in _ORDER_CACHE:
        if len(_ORDER_CACHE) > 4:
            _ORDER_CACHE.clear()
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        _ORDER_CACHE[key] = torch.randperm(n, generator=g)
    return _ORDER_CACHE[key]


def step_generator(seed: int, *parts: int, device: torch.device | None = None) -> torch.Generator:
    """A generator seeded from (seed, parts...): the same on every TP rank of a DP group when the
    parts are the same, so resumed runs draw the same numbers without saving generator state."""
    from carft_mega.rollout.sampling import mix_seed

    g = torch.Generator(device=device or "cpu")
    g.manual_seed(mix_seed(seed, *parts))
    return g


def sft_total_steps(cfg: TrainerConfig, n_train: int) -> int:
    if cfg.sft.max_steps is not None:
        return cfg.sft.max_steps
    return max(1, math.ceil(cfg.sft.epochs * n_train / cfg.sft.global_batch_size))


def rl_total_steps(cfg: TrainerConfig, n_train: int) -> int:
    if cfg.ppo.max_steps is not None:
        return cfg.ppo.max_steps
    # RL batches never straddle two epochs (Run.local_indices, drop_last): n // batch per epoch.
    return max(1, math.ceil(cfg.ppo.epochs * (n_train // cfg.ppo.rollout_batch_size)))


def _check_batch_sizes(cfg: TrainerConfig) -> None:
    dp = parallel.dp_size()
    for name, value in (("sft.global_batch_size", cfg.sft.global_batch_size),
                        ("ppo.rollout_batch_size", cfg.ppo.rollout_batch_size)):
        if value % dp:
            raise ValueError(f"config field '{name}' = {value}: must be a multiple of the data-parallel "
                             f"size {dp} (world {dist.get_world_size()} / tp {parallel.tp_size()})")
    local = cfg.sft.global_batch_size // dp
    if local % cfg.sft.micro_batch_size:
        raise ValueError(f"config field 'sft.micro_batch_size' = {cfg.sft.micro_batch_size}: must divide "
                         f"the per-rank batch sft.global_batch_size / dp = {local}")


def setup_run(cfg: TrainerConfig) -> Run:
    """Initialise distributed state, logging, tokenizer, data and the sandbox."""
    from carft_mega.data.loaders import load_from_config
    from carft_mega.data.tokenizers import load_tokenizer

    parallel.init_distributed(cfg.parallel, seed=cfg.seed)
    _check_batch_sizes(cfg)
    rank0 = dist.get_rank() == 0
    if rank0:
        os.makedirs(cfg.out_dir, exist_ok=True)
        save_config(cfg, os.path.join(cfg.out_dir, "config.yaml"))
        print(f"carft_mega: world {dist.get_world_size()} = tp {parallel.tp_size()} x dp {parallel.dp_size()}, "
              f"device {parallel.device()}, resolved config (saved to {cfg.out_dir}/config.yaml):\n"
              + format_config(cfg), flush=True)
    logger = MetricsLogger(cfg.out_dir, enabled=rank0, tensorboard=cfg.logging.tensorboard,
                           progress_bar=cfg.logging.progress_bar, plot=cfg.logging.plot)
    tok_path = cfg.model.tokenizer
    if tok_path is None and cfg.model.source in ("hf", "mcore"):
        tok_path = _tokenizer_of_model(cfg)
    tokenizer = load_tokenizer(tok_path) if not (tok_path and tok_path.endswith(".gguf")) else \
        load_tokenizer(os.path.dirname(tok_path), gguf_file=os.path.basename(tok_path))
    train = load_from_config(cfg.data, "train")
    test = load_from_config(cfg.data, "test")
    for split, recs in (("train", train), ("test", test)):
        if not recs:
            raise ValueError(f"the {split} split of {cfg.data.dataset} is empty")
    if cfg.ppo.enabled and len(train) < cfg.ppo.rollout_batch_size:
        raise ValueError(f"config field 'ppo.rollout_batch_size' = {cfg.ppo.rollout_batch_size}: larger than "
                         f"the training set ({len(train)} records)")
    sandbox = None
    if cfg.data.style == "python" and parallel.tp_rank() == 0:  # programs run once per TP group
        from carft_mega.reward.sandbox import Sandbox
        sandbox = Sandbox.from_config(cfg.reward)
    if rank0:
        print(f"data: {len(train)} train / {len(test)} test records ({cfg.data.dataset}, {cfg.data.style}); "
              f"tokenizer {tokenizer.name} (vocab {tokenizer.vocab_size})", flush=True)
    return Run(cfg=cfg, tokenizer=tokenizer, tokenizer_dir=tok_path if tok_path and os.path.isdir(tok_path) else None,
               train=train, test=test, logger=logger, ckpts=CheckpointManager(
                   os.path.join(cfg.out_dir, "checkpoints"), cfg.checkpoint.keep_last),
               sandbox=sandbox, device=parallel.device())


def _tokenizer_of_model(cfg: TrainerConfig) -> str:
    """Tokenizer location implied by the model source."""
    if cfg.model.source == "mcore":
        from carft_mega.models.build import tokenizer_dir_of
        tok = tokenizer_dir_of(cfg.model.path)
        if tok is None:
            raise ValueError(f"config field 'model.tokenizer' is unset and the checkpoint {cfg.model.path} "
                             f"carries no tokenizer: set model.tokenizer")
        return tok
    return cfg.model.path


def build_initial_policy(run: Run):
    """The stage-1 policy from ``model.source`` (tiny, HF or Megatron checkpoint)."""
    from carft_mega.models.build import build_policy

    return build_policy(run.cfg.model, run.cfg.parallel, vocab_size=run.tokenizer.vocab_size)
