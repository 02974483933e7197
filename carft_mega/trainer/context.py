"""What every stage shares: the run context (config, tokenizer, data, logger, checkpoints), the
deterministic data order, and step counts; how a launch opens a run (checks, resume point, config
comparison, a finished run) before any model is loaded.

Data order is a pure function of (seed, step): epoch ``e`` is a seeded permutation of the
training set, and step ``s`` of a stage takes the next global batch from the stream of epochs,
rank ``r`` its ``r``-th slice. RL batches never straddle two epochs (no prompt twice in a batch).
The step counter is the data cursor.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from carft_mega import parallel
from carft_mega.config import TrainerConfig, format_config
from carft_mega.trainer.checkpoint import CheckpointManager, CheckpointRef
from carft_mega.trainer.metrics import MetricsLogger
from carft_mega.trainer.preflight import ModelFacts, RunError, checkpoint_bytes, preflight
from carft_mega.trainer.runconfig import check_resume, read_saved_config, record_launch
from carft_mega.trainer.stop import StopRequest


class TrainingStopped(RuntimeError):
    """Raised when a run must stop (too many consecutive non-finite losses)."""


@dataclass
class Run:
    """Everything a stage needs besides its engine.

    Attributes:
        cfg: the resolved configuration.
        tokenizer: a ``carft_mega.data.tokenizers.Tokenizer``.
        tokenizer_dir: what every checkpoint and HF export carries as its tokenizer: ``"char"`` (the
            character tokenizer) or the run's ``<out_dir>/tokenizer`` directory (copied verbatim).
        train, test: records.
        logger: rank-0 metrics logger (no-op elsewhere).
        ckpts: checkpoint manager under ``<out_dir>/checkpoints``.
        sandbox: pool for python-style answers (None for nl).
        device: this rank's device.
        stop: signal and timed-save requests, polled once per step (``trainer/stop.py``).
        resume: the checkpoint this launch continues from (None: a fresh start).
        facts: what the preflight learned about the model (size, KV heads).
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
    stop: StopRequest = field(default_factory=StopRequest)
    resume: CheckpointRef | None = None
    facts: ModelFacts | None = None
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


@dataclass
class Opening:
    """What a launch finds before loading any model (:func:`open_run`).

    Attributes:
        resume: the checkpoint to continue from, or None.
        notes: accepted config changes on resume (printed).
        train, test: the data.
        facts: the preflight's view of the model.
        finished: the run's ``results.json`` when the run is already finished, else None.
    """

    resume: CheckpointRef | None
    notes: list[str]
    train: list
    test: list
    facts: ModelFacts
    finished: dict[str, Any] | None


def _on_rank0(fn):
    """Run ``fn`` on rank 0 only; its RunError (or any error, as one line) is raised on every rank."""
    out, err = None, None
    if not dist.is_initialized() or dist.get_rank() == 0:
        try:
            out = fn()
        except RunError as e:
            err = str(e)
        except (OSError, ValueError) as e:
            err = f"{type(e).__name__}: {e}"
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [(out, err)]
        dist.broadcast_object_list(box, src=0)
        out, err = box[0]
    if err:
        raise RunError(err)
    return out


def open_run(cfg: TrainerConfig) -> Opening:
    """Checks, the resume point, the config comparison, the data and whether the run is finished.

    Writes nothing. Works in a plain process without a process group (``carft_mega.launch`` runs it
    before torchrun starts) and collectively under torchrun (rank 0 checks the filesystem and
    broadcasts; every rank loads the data).

    Raises:
        RunError: one line naming the config field or the file.
    """
    facts = _on_rank0(lambda: preflight(cfg))
    ckpts = CheckpointManager(os.path.join(cfg.out_dir, "checkpoints"), cfg.checkpoint.keep_last)
    try:
        resume = ckpts.resolve(cfg.checkpoint.resume)
    except (ValueError, FileNotFoundError) as e:
        raise RunError(str(e)) from None
    notes: list[str] = []
    if resume is not None:
        saved = CheckpointManager.read_state(resume).get("config") or read_saved_config(cfg.out_dir)
        notes = check_resume(saved, cfg, resume.stage, resume.path)
    train, test = load_data(cfg)
    return Opening(resume=resume, notes=notes, train=train, test=test, facts=facts,
                   finished=finished_results(cfg, resume, len(train)))


def load_data(cfg: TrainerConfig) -> tuple[list, list]:
    """Both splits; a missing or malformed file is a RunError naming the field or the file."""
    from carft_mega.data.loaders import load_from_config
    from carft_mega.data.records import DataError

    try:
        train = load_from_config(cfg.data, "train")
        test = load_from_config(cfg.data, "test")
    except (DataError, FileNotFoundError) as e:
        raise RunError(str(e)) from None
    for split, recs in (("train", train), ("test", test)):
        if not recs:
            raise RunError(f"the {split} split of {cfg.data.dataset} is empty")
    if cfg.ppo.enabled and len(train) < cfg.ppo.rollout_batch_size:
        raise RunError(f"config field 'ppo.rollout_batch_size' = {cfg.ppo.rollout_batch_size}: larger than "
                       f"the training set ({len(train)} records)")
    return train, test


def last_stage_total(cfg: TrainerConfig, n_train: int) -> tuple[str, int]:
    """The run's last stage and its step count (rollout steps for RL)."""
    if cfg.ppo.enabled:
        return "carft", rl_total_steps(cfg, n_train)
    return "sft", sft_total_steps(cfg, n_train)


def finished_results(cfg: TrainerConfig, resume: CheckpointRef | None, n_train: int) -> dict[str, Any] | None:
    """``results.json`` when the run is finished: it was written (every stage done, evaluated and
    exported) for the checkpoint ``resume`` points at, which is the last stage's final one under
    this config. Raising a step limit makes a finished run unfinished again."""
    path = os.path.join(cfg.out_dir, "results.json")
    if resume is None or not os.path.exists(path):
        return None
    with open(path) as f:
        res = json.load(f)
    stage, total = last_stage_total(cfg, n_train)
    final = res.get("final_checkpoint" if stage == "carft" else "sft_checkpoint")
    if (resume.stage, resume.step) != (stage, total) or not final:
        return None
    final = final if os.path.isabs(final) else os.path.join(cfg.out_dir, final)
    return res if os.path.realpath(final) == os.path.realpath(resume.path) else None


def finished_message(cfg: TrainerConfig, res: dict[str, Any]) -> str:
    accs = ", ".join(f"{k} {v:.4f}" for k, v in res.items() if k.endswith("accuracy") and isinstance(v, float))
    final = res.get("final_checkpoint") or res.get("sft_checkpoint")
    return (f"carft_mega: the run in {cfg.out_dir} is finished ({accs}; final checkpoint {final}): nothing to do. "
            f"Raise ppo.max_steps / sft.max_steps to train further, or checkpoint.resume=none to start afresh")


def setup_run(cfg: TrainerConfig, stop: StopRequest | None = None) -> tuple[Run | None, Opening]:
    """Initialise distributed state; open the run (:func:`open_run`); then, unless it is finished,
    load the tokenizer, write the run's config record, and build the logger and the sandbox.

    Returns:
        ``(run, opening)``; ``run`` is None for a finished run (nothing was loaded or written).
    """
    try:
        parallel.init_distributed(cfg.parallel, seed=cfg.seed)
        _check_batch_sizes(cfg)
    except ValueError as e:  # the world size does not fit parallel.tp or a batch size (names the field)
        raise RunError(str(e)) from None
    opening = open_run(cfg)
    if opening.finished is not None:
        return None, opening
    rank0 = dist.get_rank() == 0
    tok_src = tokenizer_source(cfg)
    tokenizer = _load_tokenizer(cfg, tok_src)
    tok_dir = "char" if tok_src == "char" else os.path.join(cfg.out_dir, "tokenizer")
    resume = opening.resume

    def start():  # the launch really starts: its record, and the tokenizer every checkpoint carries
        from carft_mega.models.convert import save_tokenizer

        os.makedirs(cfg.out_dir, exist_ok=True)
        if tok_src != "char":
            import shutil

            shutil.rmtree(tok_dir, ignore_errors=True)
            if save_tokenizer(tok_src, tok_dir) is None:
                raise RunError(f"no tokenizer files found in {tok_src} (config field 'model.tokenizer')")
        return record_launch(cfg, resume.path if resume else None, opening.notes)

    history = _on_rank0(start)
    logger = MetricsLogger(cfg.out_dir, enabled=rank0, tensorboard=cfg.logging.tensorboard,
                           progress_bar=cfg.logging.progress_bar, plot=cfg.logging.plot)
    logger.set_stage_offsets(sft_total_steps(cfg, len(opening.train)) if cfg.sft.enabled else 0)
    if cfg.logging.wandb:
        err = None
        if rank0:
            from carft_mega.trainer.wandb_sink import WandbSink

            try:
                logger.add_sink(WandbSink(cfg))
            except RunError as e:
                err = str(e)
        if dist.get_world_size() > 1:
            box = [err]
            dist.broadcast_object_list(box, src=0)
            err = box[0]
        if err:
            logger.close()
            raise RunError(err)
    sandbox = _start_sandbox(cfg, logger)
    facts = opening.facts
    ckpts = CheckpointManager(os.path.join(cfg.out_dir, "checkpoints"), cfg.checkpoint.keep_last,
                              keep_best=cfg.checkpoint.keep_best,
                              expected_bytes=checkpoint_bytes(facts.params, cfg.model.dtype) if facts.params else 0)
    run = Run(cfg=cfg, tokenizer=tokenizer, tokenizer_dir=tok_dir, train=opening.train, test=opening.test,
              logger=logger, ckpts=ckpts, sandbox=sandbox, device=parallel.device(),
              stop=stop or StopRequest(cfg.checkpoint.save_interval_minutes), resume=resume, facts=facts)
    if rank0:
        print(f"carft_mega: world {dist.get_world_size()} = tp {parallel.tp_size()} x dp {parallel.dp_size()}, "
              f"device {parallel.device()}, resolved config (saved to {cfg.out_dir}/config.yaml, launch record "
              f"{os.path.relpath(history, cfg.out_dir)}):\n" + format_config(cfg), flush=True)
        for note in opening.notes:
            print(note, flush=True)
        print(f"data: {len(run.train)} train / {len(run.test)} test records ({cfg.data.dataset}, {cfg.data.style}); "
              f"tokenizer {tokenizer.name} (vocab {tokenizer.vocab_size})", flush=True)
    return run, opening


def _start_sandbox(cfg: TrainerConfig, logger: MetricsLogger):
    """The sandbox of python-style rewards (on each TP group's first rank; None elsewhere). A machine
    that cannot isolate programs is a RunError on every rank (its message says what to set)."""
    from carft_mega.trainer.checkpoint import _all_ok

    sandbox, err = None, None
    if cfg.data.style == "python" and parallel.tp_rank() == 0:  # programs run once per TP group
        from carft_mega.reward.sandbox import Sandbox, SandboxUnavailableError
        try:
            sandbox = Sandbox.from_config(cfg.reward)
        except SandboxUnavailableError as e:
            err = f"data.style=python: {e}"
    err = _all_ok(err is None, err)
    if err:
        if sandbox is not None:
            sandbox.close()
        logger.close()
        raise RunError(err)
    return sandbox


def tokenizer_source(cfg: TrainerConfig) -> str:
    """Where the tokenizer comes from: ``model.tokenizer``; else the model (an HF directory or GGUF
    file, or the tokenizer a checkpoint carries); else ``"char"`` for the tiny model."""
    if cfg.model.tokenizer:
        return cfg.model.tokenizer
    if cfg.model.source == "tiny":
        return "char"
    if cfg.model.source == "mcore":
        from carft_mega.models.build import tokenizer_dir_of
        tok = tokenizer_dir_of(cfg.model.path)
        if tok is None:  # the preflight refuses this already
            raise RunError(f"config field 'model.tokenizer' is unset and the checkpoint {cfg.model.path} "
                           f"carries no tokenizer: set model.tokenizer")
        return tok
    return cfg.model.path


def _load_tokenizer(cfg: TrainerConfig, src: str):
    from carft_mega.data.tokenizers import load_tokenizer

    field_name = "model.tokenizer" if cfg.model.tokenizer else "model.path"
    try:
        if src.endswith(".gguf"):
            return load_tokenizer(os.path.dirname(src), gguf_file=os.path.basename(src))
        return load_tokenizer(src)
    except Exception as e:  # transformers raises OSError, ValueError, TypeError, ...
        msg = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise RunError(f"cannot load the tokenizer from {src} (config field '{field_name}'): {msg}") from None


def build_initial_policy(run: Run):
    """The stage-1 policy from ``model.source`` (tiny, HF or Megatron checkpoint)."""
    from carft_mega.models.build import build_policy

    return build_policy(run.cfg.model, run.cfg.parallel, vocab_size=run.tokenizer.vocab_size)
