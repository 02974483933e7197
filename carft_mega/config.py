"""Run configuration: nested dataclasses, YAML loading and ``section.field=value`` overrides.

Defaults are the paper's hyper-parameters (arXiv 2508.15868, Sec. 5; ReFT's PPO settings, see
``docs/deviations.md``). Every field has a one-line docstring under it; ``validate`` raises a
``ValueError`` that names the field and the bad value.

Example::

    cfg = load_config("examples/configs/quickstart.yaml", ["ppo.max_steps=3", "parallel.tp=2"])
    print(format_config(cfg))
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml


@dataclass(kw_only=True)
class TinyModelConfig:
    """A small random model built in code (tests, the quick start)."""

    arch: Literal["llama", "qwen2", "mistral"] = "llama"
    """Architecture family of the tiny model."""
    hidden_size: int = 64
    """Hidden size H."""
    num_layers: int = 2
    """Number of transformer layers."""
    num_heads: int = 4
    """Number of attention heads."""
    num_kv_heads: int = 2
    """Number of key/value heads (GQA when smaller than num_heads)."""
    ffn_hidden_size: int = 128
    """SwiGLU intermediate size."""
    tie_embeddings: bool = True
    """Share the input embedding and the LM head."""
    max_position_embeddings: int = 512
    """Longest sequence the rotary tables are built for."""
    rope_theta: float = 10000.0
    """RoPE base."""


@dataclass(kw_only=True)
class ModelConfig:
    """Which policy to build and how."""

    source: Literal["tiny", "hf", "mcore"] = "tiny"
    """'tiny': random model from ``tiny``; 'hf': HF directory or GGUF file at ``path``;
    'mcore': a Megatron dist_checkpointing directory written by tools/ or the trainer."""
    path: str | None = None
    """HF directory, GGUF file or Megatron checkpoint directory (for source hf/mcore)."""
    tokenizer: str | None = None
    """Tokenizer directory; None uses ``path`` (hf/mcore) or the character tokenizer (tiny)."""
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)
    """Dimensions of the tiny model (source=tiny)."""
    cot_proj_dim: int = 64
    """d_proj of the CoT head: e_t = W_p h_t + b_p (authors' ValueHeadV2)."""
    head_trunk_grad_scale: float = 1.0
    """Factor on the gradient the CoT/value head (value and contrastive losses) sends into the trunk:
    1 = the authors' shared trunk; smaller protects a small policy from its random-init critic."""
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    """Compute dtype; auto = bf16 on GPU, fp32 on CPU. fp16 is refused for training (it needs dynamic
    loss scaling, which the trainer does not wire); the conversion tools accept it."""
    fp8: bool = False
    """FP8 GEMMs through Transformer Engine (H100 and newer; needs transformer_engine)."""
    transformer_impl: Literal["auto", "local", "transformer_engine"] = "auto"
    """Megatron layer spec; auto = TE when transformer_engine imports, else local."""
    kernels: Literal["auto", "ref"] = "auto"
    """Fused kernels: auto = Triton/CUDA when usable, else the PyTorch reference; ref = always reference."""
    recompute_activations: bool = False
    """Full activation recomputation of every layer (saves memory on long sequences)."""
    seed: int = 1234
    """Initialisation seed of the tiny model and the CoT head."""


@dataclass(kw_only=True)
class ParallelConfig:
    """Megatron process layout. world = tp * dp."""

    tp: int = 1
    """Tensor-parallel size."""
    sequence_parallel: bool = False
    """Megatron sequence parallelism (needs tp > 1)."""
    backend: Literal["auto", "nccl", "gloo"] = "auto"
    """torch.distributed backend; auto = nccl with CUDA, gloo otherwise."""
    distributed_optimizer: bool = True
    """Shard optimizer state over data-parallel ranks (Megatron DistributedOptimizer)."""


@dataclass(kw_only=True)
class DataConfig:
    """Training and evaluation data."""

    dataset: Literal["synthetic", "gsm8k", "svamp"] = "synthetic"
    """Task; 'synthetic' is the embedded offline arithmetic generator."""
    style: Literal["nl", "python"] = "nl"
    """CoT style: natural language or ReFT's python_sdp programs."""
    train_path: str | None = None
    """Explicit training file (JSON/JSONL); overrides data_dir and the hub."""
    test_path: str | None = None
    """Explicit test file; overrides data_dir and the hub."""
    data_dir: str | None = None
    """Folder with <dataset>/ files; None reads $CARFT_DATA_DIR."""
    max_prompt_tokens: int = 300
    """Prompts are truncated (from the left) to this many tokens (ReFT max_input_length)."""
    max_length: int = 1024
    """Longest prompt + target (SFT) or prompt + generation (RL) in tokens."""
    skip_bad_rows: bool = False
    """Skip malformed rows (counted and logged) instead of raising."""
    eval_limit: int | None = None
    """Evaluate on the first N test records only (None = all)."""
    train_limit: int | None = None
    """Use the first N training records only (None = all)."""
    synthetic_train_size: int = 2000
    """Number of synthetic training problems."""
    synthetic_test_size: int = 200
    """Number of synthetic test problems."""
    synthetic_min_steps: int = 1
    """Fewest arithmetic steps in a synthetic problem."""
    synthetic_max_steps: int = 3
    """Most arithmetic steps in a synthetic problem."""
    synthetic_max_value: int = 99
    """Largest number in a synthetic problem (the difficulty knob; >= 2)."""
    synthetic_annotation_noise: float = 0.0
    """Fraction of synthetic training annotations whose answer line is wrong (the gold stays right)."""
    seed: int = 0
    """Seed of the synthetic generator and of the shuffling."""


@dataclass(kw_only=True)
class SFTConfig:
    """Stage 1: supervised warm-up on prompt -> CoT + answer line + EOS."""

    enabled: bool = True
    """Run the SFT stage (False starts RL from model.path as is)."""
    epochs: float = 2.0
    """Passes over the training set (the authors' RL starts from an ~epoch-2 SFT checkpoint)."""
    max_steps: int | None = None
    """Stop after this many optimizer steps (overrides epochs)."""
    global_batch_size: int = 64
    """Sequences per optimizer step, over all data-parallel ranks."""
    micro_batch_size: int = 4
    """Sequences per forward/backward on one rank."""
    lr: float = 1e-5
    """Peak learning rate (paper: 1e-5)."""
    schedule: Literal["constant", "linear"] = "linear"
    """LR schedule: constant, or linear warm-up then linear decay to 0 (ReFT SFT)."""
    warmup_ratio: float = 0.1
    """Fraction of steps spent in linear warm-up (linear schedule)."""
    max_nonfinite_steps: int = 3
    """Stop the run after this many consecutive SFT steps with a NaN/inf loss or gradient (those
    updates are skipped)."""


@dataclass(kw_only=True)
class PPOConfig:
    """Stage 2: ReFT-style PPO, or Dr.GRPO (DESIGN.md Sec. 6)."""

    enabled: bool = True
    """Run the RL stage."""
    estimator: Literal["gae", "drgrpo"] = "gae"
    """Advantage estimator. gae: ReFT's PPO with a critic (ReFT, CARFT); drgrpo: Dr.GRPO (Liu et al.
    2025), A_i = r_i - mean of its prompt's G samples (rollout.samples_per_prompt >= 2), no critic,
    token-sum loss over a constant; the paper's third baseline runs it with G = 2."""
    epochs: float = 100.0
    """Passes over the training prompts (each pass: n // rollout_batch_size batches of distinct prompts)."""
    max_steps: int | None = None
    """Stop after this many rollout steps (overrides epochs)."""
    rollout_batch_size: int = 64
    """Prompts per rollout step, over all data-parallel ranks (paper: 64)."""
    micro_batch_size: int = 4
    """Sequences per training forward/backward on one rank."""
    ppo_epochs: int = 2
    """Optimisation epochs U over each rollout batch (one optimizer step per epoch)."""
    lr: float = 3e-7
    """Learning rate (paper: 3e-7)."""
    schedule: Literal["constant", "linear"] = "constant"
    """LR schedule (ReFT: constant)."""
    warmup_ratio: float = 0.0
    """Fraction of steps in linear warm-up (linear schedule)."""
    clip_eps: float = 0.2
    """PPO ratio clip epsilon."""
    value_clip: float = 0.2
    """Value clip around the rollout-time values."""
    vf_coef: float = 5.0
    """alpha: weight of the value loss."""
    kl_coef: float = 0.05
    """beta: k1 KL penalty in the token rewards (ReFT: 0.05 nl, 0.01 python); with estimator=drgrpo
    the weight of a k3 KL loss term instead (GRPO's KL; there are no token rewards to shape)."""
    gamma: float = 1.0
    """GAE discount."""
    lam: float = 0.95
    """GAE lambda."""
    critic_warmup_steps: int = 0
    """Rollout steps at the start of RL that train only the value loss (verl's critic_warmup): the
    CoT/value head starts random, and its per-token noise otherwise drives the first policy updates."""
    whiten_advantages: Literal["auto", "global", "local", "none"] = "auto"
    """Advantage whitening (A - mean) / std over the global batch, the local batch, or not at all;
    auto = global for gae (ReFT), none for drgrpo (its advantage is not rescaled)."""
    whiten_add_mean_back: bool = False
    """Add the mean back after whitening. False (centred) is ReFT's default (its shift_mean=False);
    True is its non-default shift_mean=True."""
    loss_agg: Literal["auto", "token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"] = "auto"
    """Reduction of the policy, value and KL losses, normalised by global counts; auto = token-mean
    for gae, seq-mean-token-sum-norm (sum over tokens / (rollout.max_new_tokens x sequences)) for
    drgrpo."""
    max_nonfinite_steps: int = 3
    """Stop the run after this many consecutive RL steps with a NaN/inf loss or gradient (those
    updates are skipped)."""

    def resolved_whitening(self) -> str:
        """``whiten_advantages`` with ``auto`` resolved for the estimator."""
        if self.whiten_advantages != "auto":
            return self.whiten_advantages
        return "none" if self.estimator == "drgrpo" else "global"

    def resolved_loss_agg(self) -> str:
        """``loss_agg`` with ``auto`` resolved for the estimator."""
        if self.loss_agg != "auto":
            return self.loss_agg
        return "seq-mean-token-sum-norm" if self.estimator == "drgrpo" else "token-mean"


@dataclass(kw_only=True)
class ContrastiveConfig:
    """CARFT's contrastive term (DESIGN.md Sec. 4)."""

    signal: Literal["positive", "negative", "both", "none"] = "positive"
    """positive = Eq. 7 (paper default), negative = Eq. 8, both = their mean, none = ReFT."""
    coef: float = 1e-3
    """c: weight of the contrastive loss."""
    tau: float = 0.2
    """Temperature of sim(a, b) = cos(a, b) / tau."""
    clamp_positive_cos: float | None = None
    """Clamp the positive pair's cosine at this value (authors' code uses 0.9; None = off)."""


@dataclass(kw_only=True)
class RewardConfig:
    """Terminal score of a rollout (DESIGN.md Sec. 5)."""

    partial: Literal["none", "reft", "embedding"] = "embedding"
    """Reward for a wrong but extracted answer: 0, 0.1 (ReFT), or 0.1*cos(za, zr)+0.2 (CARFT)."""
    tolerance: float = 1e-2
    """An answer is correct when |pred - gold| <= tolerance."""
    sandbox_workers: int = 2
    """Sandbox worker processes (python-style CoT)."""
    sandbox_timeout: float = 10.0
    """Wall-clock seconds per program (ReFT: 10)."""
    sandbox_cpu_seconds: int = 5
    """RLIMIT_CPU per program."""
    sandbox_memory_mb: int = 1024
    """RLIMIT_AS per worker, in MiB."""


@dataclass(kw_only=True)
class RolloutConfig:
    """Sampling (pinned explicitly; no generation_config.json fallbacks)."""

    max_new_tokens: int = 700
    """Generation length limit (ReFT max_gen_length 700)."""
    temperature: float = 1.0
    """Sampling temperature (paper: 1.0)."""
    top_k: int = 0
    """Top-k filter; 0 disables it (paper). Refused for RL training: the filtered distribution is not
    the one the PPO ratio and the KL are computed under (the generate command may use it)."""
    top_p: float = 1.0
    """Nucleus filter; 1.0 disables it (paper). Refused for RL training, like top_k."""
    samples_per_prompt: int = 1
    """G: rollouts per prompt in one rollout batch (CARFT / ReFT: 1; Dr.GRPO: G >= 2, paper 2). The G
    samples of a prompt share its annotated CoT and are not each other's InfoNCE negatives."""
    eval_max_new_tokens: int = 700
    """Generation length limit of the greedy evaluation."""
    eval_batch_size: int = 32
    """Prompts per greedy evaluation batch on one rank."""


@dataclass(kw_only=True)
class OptimConfig:
    """AdamW settings shared by both stages (ReFT: wd 0, eps 1e-8, clip 1.0)."""

    weight_decay: float = 0.0
    """Decoupled weight decay."""
    adam_beta1: float = 0.9
    """Adam beta1."""
    adam_beta2: float = 0.999
    """Adam beta2."""
    adam_eps: float = 1e-8
    """Adam epsilon."""
    clip_grad: float = 1.0
    """Global gradient-norm clip (0 disables)."""


@dataclass(kw_only=True)
class CheckpointConfig:
    """Checkpointing and resume."""

    save_every: int = 50
    """Save every N optimizer steps (SFT) or rollout steps (RL); 0 = only at stage ends."""
    keep_last: int = 3
    """Checkpoints kept per stage (older ones are deleted after a successful save)."""
    resume: str = "auto"
    """'auto' = latest checkpoint under out_dir, 'none', or a checkpoint directory."""
    export_hf: bool = False
    """Also write an HF directory (with the CoT head as v_head) at the end of each stage."""


@dataclass(kw_only=True)
class LoggingConfig:
    """Console, JSONL, TensorBoard and plots."""

    log_every: int = 1
    """Log metrics every N steps."""
    eval_every: int = 25
    """Greedy test accuracy every N RL steps (0 = only before and after RL)."""
    progress_bar: bool = True
    """Console progress bar with ETA (rank 0)."""
    tensorboard: bool = True
    """Write TensorBoard event files."""
    plot: bool = True
    """Write a PNG of reward, accuracy and losses next to the run."""


@dataclass(kw_only=True)
class TrainerConfig:
    """Everything one run needs."""

    out_dir: str = "runs/quickstart"
    """Run directory: config, metrics, checkpoints, eval outputs and plots go here."""
    seed: int = 42
    """Global seed (data order, sampling, dropout)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Policy model."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Parallel layout."""
    data: DataConfig = field(default_factory=DataConfig)
    """Data."""
    sft: SFTConfig = field(default_factory=SFTConfig)
    """SFT warm-up."""
    ppo: PPOConfig = field(default_factory=PPOConfig)
    """PPO stage."""
    contrastive: ContrastiveConfig = field(default_factory=ContrastiveConfig)
    """Contrastive term."""
    reward: RewardConfig = field(default_factory=RewardConfig)
    """Rewards."""
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    """Sampling."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpointing."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Logging."""

    def __post_init__(self) -> None:
        if not _DEFER_VALIDATION:
            validate(self)


# --------------------------------------------------------------------------------------------
# Validation

# Set while a file and its overrides are merged: the file alone may be incomplete (e.g. a model
# path the launcher passes on the command line); the merged result is validated once.
_DEFER_VALIDATION = False


def _fail(name: str, value: Any, why: str) -> None:
    raise ValueError(f"config field '{name}' = {value!r}: {why}")


def _positive(name: str, value: Any, allow_zero: bool = False) -> None:
    if value is None:
        return
    if allow_zero and value < 0 or not allow_zero and value <= 0:
        _fail(name, value, "must be >= 0" if allow_zero else "must be > 0")


def _check_types(obj: Any, prefix: str) -> None:
    """Check every field against its annotation (Literal choices included)."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        name = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            _check_types(value, name + ".")
            continue
        if not _matches(value, hints[f.name]):
            _fail(name, value, f"expected {_type_name(hints[f.name])}")


def _matches(value: Any, tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return value in typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(tp, type):
        return isinstance(value, tp)
    return True


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


def validate(cfg: TrainerConfig) -> None:
    """Raise ValueError naming the first bad field."""
    _check_types(cfg, "")
    t = cfg.model.tiny
    for name in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "ffn_hidden_size",
                 "max_position_embeddings"):
        _positive(f"model.tiny.{name}", getattr(t, name))
    if t.hidden_size % t.num_heads:
        _fail("model.tiny.hidden_size", t.hidden_size, f"must be divisible by num_heads={t.num_heads}")
    if t.num_heads % t.num_kv_heads:
        _fail("model.tiny.num_kv_heads", t.num_kv_heads, f"must divide num_heads={t.num_heads}")
    if cfg.model.source in ("hf", "mcore") and not cfg.model.path:
        _fail("model.path", cfg.model.path, f"required when model.source={cfg.model.source!r}")
    _positive("model.cot_proj_dim", cfg.model.cot_proj_dim)
    if cfg.model.dtype == "fp16":  # Megatron's fp16 path divides gradients by a 2**32 loss scale
        _fail("model.dtype", cfg.model.dtype, "training in fp16 needs dynamic loss scaling, which this "
              "trainer does not wire: use bf16 (A100/H100) or fp32")
    if not 0.0 <= cfg.model.head_trunk_grad_scale <= 1.0:
        _fail("model.head_trunk_grad_scale", cfg.model.head_trunk_grad_scale, "must be in [0, 1]")
    _positive("parallel.tp", cfg.parallel.tp)
    if cfg.parallel.sequence_parallel and cfg.parallel.tp == 1:
        _fail("parallel.sequence_parallel", True, "needs parallel.tp > 1")
    d = cfg.data
    _positive("data.max_prompt_tokens", d.max_prompt_tokens)
    _positive("data.max_length", d.max_length)
    if d.max_prompt_tokens >= d.max_length:
        _fail("data.max_prompt_tokens", d.max_prompt_tokens, f"must be < data.max_length={d.max_length}")
    _positive("data.eval_limit", d.eval_limit)
    _positive("data.train_limit", d.train_limit)
    _positive("data.synthetic_train_size", d.synthetic_train_size)
    _positive("data.synthetic_test_size", d.synthetic_test_size)
    _positive("data.synthetic_min_steps", d.synthetic_min_steps)
    if not 0.0 <= d.synthetic_annotation_noise <= 1.0:
        _fail("data.synthetic_annotation_noise", d.synthetic_annotation_noise, "must be in [0, 1]")
    if d.synthetic_max_value < 2:
        _fail("data.synthetic_max_value", d.synthetic_max_value, "must be >= 2")
    if d.synthetic_max_steps < d.synthetic_min_steps:
        _fail("data.synthetic_max_steps", d.synthetic_max_steps, "must be >= data.synthetic_min_steps")
    for stage in ("sft", "ppo"):
        s = getattr(cfg, stage)
        _positive(f"{stage}.epochs", s.epochs)
        _positive(f"{stage}.max_steps", s.max_steps)
        _positive(f"{stage}.micro_batch_size", s.micro_batch_size)
        _positive(f"{stage}.lr", s.lr, allow_zero=True)
        if not 0.0 <= s.warmup_ratio < 1.0:
            _fail(f"{stage}.warmup_ratio", s.warmup_ratio, "must be in [0, 1)")
    _positive("sft.global_batch_size", cfg.sft.global_batch_size)
    if cfg.sft.global_batch_size % cfg.sft.micro_batch_size:
        _fail("sft.global_batch_size", cfg.sft.global_batch_size,
              f"must be a multiple of sft.micro_batch_size={cfg.sft.micro_batch_size}")
    _positive("sft.max_nonfinite_steps", cfg.sft.max_nonfinite_steps)
    if not cfg.sft.enabled and not cfg.ppo.enabled:
        _fail("ppo.enabled", False, "and sft.enabled is false too: the run has nothing to do")
    p = cfg.ppo
    _positive("ppo.rollout_batch_size", p.rollout_batch_size)
    _positive("ppo.ppo_epochs", p.ppo_epochs)
    _positive("ppo.clip_eps", p.clip_eps)
    _positive("ppo.value_clip", p.value_clip)
    _positive("ppo.vf_coef", p.vf_coef, allow_zero=True)
    _positive("ppo.kl_coef", p.kl_coef, allow_zero=True)
    _positive("ppo.max_nonfinite_steps", p.max_nonfinite_steps)
    _positive("ppo.critic_warmup_steps", p.critic_warmup_steps, allow_zero=True)
    if not 0.0 <= p.gamma <= 1.0:
        _fail("ppo.gamma", p.gamma, "must be in [0, 1]")
    if not 0.0 <= p.lam <= 1.0:
        _fail("ppo.lam", p.lam, "must be in [0, 1]")
    ro = cfg.rollout
    if p.enabled:
        # The behaviour policy must be the distribution every training-side log-prob refers to.
        if ro.top_k != 0:
            _fail("rollout.top_k", ro.top_k, "must be 0 for RL training: a top-k filtered sampler is not the "
                  "softmax(logits / T) that the PPO ratio, its clip and the KL are computed under")
        if ro.top_p != 1.0:
            _fail("rollout.top_p", ro.top_p, "must be 1.0 for RL training: a nucleus-filtered sampler is not the "
                  "softmax(logits / T) that the PPO ratio, its clip and the KL are computed under")
        if p.estimator == "drgrpo":
            if ro.samples_per_prompt < 2:
                _fail("rollout.samples_per_prompt", ro.samples_per_prompt, "must be >= 2 with ppo.estimator=drgrpo "
                      "(a group of one has advantage 0: nothing to learn); the paper uses 2")
            if p.critic_warmup_steps:
                _fail("ppo.critic_warmup_steps", p.critic_warmup_steps, "must be 0 with ppo.estimator=drgrpo "
                      "(it has no critic)")
            if p.loss_agg == "seq-mean-token-mean":
                _fail("ppo.loss_agg", p.loss_agg, "is GRPO's per-sequence length normalisation, which "
                      "Dr.GRPO removes; use auto (seq-mean-token-sum-norm) or token-mean")
    c = cfg.contrastive
    _positive("contrastive.coef", c.coef, allow_zero=True)
    _positive("contrastive.tau", c.tau)
    if c.clamp_positive_cos is not None and not -1.0 <= c.clamp_positive_cos <= 1.0:
        _fail("contrastive.clamp_positive_cos", c.clamp_positive_cos, "must be in [-1, 1]")
    r = cfg.reward
    _positive("reward.tolerance", r.tolerance, allow_zero=True)
    _positive("reward.sandbox_workers", r.sandbox_workers)
    _positive("reward.sandbox_timeout", r.sandbox_timeout)
    _positive("reward.sandbox_cpu_seconds", r.sandbox_cpu_seconds)
    _positive("reward.sandbox_memory_mb", r.sandbox_memory_mb)
    _positive("rollout.max_new_tokens", ro.max_new_tokens)
    _positive("rollout.eval_max_new_tokens", ro.eval_max_new_tokens)
    _positive("rollout.eval_batch_size", ro.eval_batch_size)
    _positive("rollout.samples_per_prompt", ro.samples_per_prompt)
    _positive("rollout.temperature", ro.temperature)
    _positive("rollout.top_k", ro.top_k, allow_zero=True)
    if not 0.0 < ro.top_p <= 1.0:
        _fail("rollout.top_p", ro.top_p, "must be in (0, 1]")
    if d.max_prompt_tokens + ro.max_new_tokens > d.max_length:
        _fail("rollout.max_new_tokens", ro.max_new_tokens,
              f"data.max_prompt_tokens ({d.max_prompt_tokens}) + rollout.max_new_tokens must be "
              f"<= data.max_length ({d.max_length})")
    o = cfg.optim
    _positive("optim.weight_decay", o.weight_decay, allow_zero=True)
    _positive("optim.adam_eps", o.adam_eps)
    _positive("optim.clip_grad", o.clip_grad, allow_zero=True)
    for name in ("adam_beta1", "adam_beta2"):
        if not 0.0 <= getattr(o, name) < 1.0:
            _fail(f"optim.{name}", getattr(o, name), "must be in [0, 1)")
    _positive("checkpoint.save_every", cfg.checkpoint.save_every, allow_zero=True)
    _positive("checkpoint.keep_last", cfg.checkpoint.keep_last)
    _positive("logging.log_every", cfg.logging.log_every)
    _positive("logging.eval_every", cfg.logging.eval_every, allow_zero=True)


# --------------------------------------------------------------------------------------------
# Building from dicts, YAML and overrides


def _fit(value: Any, tp: Any) -> Any:
    """Numbers YAML leaves as strings (``1e-3`` needs a dot in YAML 1.1) for float fields; ints
    for float fields."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp) if origin in (typing.Union, types.UnionType) else (tp,)
    if float in args and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    if float in args and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a nested dict; unknown keys raise ValueError naming them."""
    if not isinstance(data, dict):
        raise ValueError(f"config section '{prefix.rstrip('.') or '<root>'}' must be a mapping, "
                         f"got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"unknown config field(s) {', '.join(prefix + u for u in unknown)}; "
                         f"known in this section: {', '.join(sorted(names))}")
    kwargs = {}
    for key, value in data.items():
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = from_dict(tp, value or {}, prefix + key + ".")
        else:
            kwargs[key] = _fit(value, tp)
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict[str, Any]:
    """Nested plain-dict view (for YAML/JSON)."""
    return dataclasses.asdict(cfg)


def _coerce(value: str, tp: Any, name: str) -> Any:
    """Parse an override string with YAML rules, then fit it to the field's type."""
    parsed = yaml.safe_load(value) if value != "" else None
    if isinstance(parsed, str) and parsed.lower() in ("none", "null") and not _matches(parsed, tp):
        parsed = None  # "none" is a value of Literal fields such as contrastive.signal; else null
    origin = typing.get_origin(tp)
    args = typing.get_args(tp) if origin in (typing.Union, types.UnionType) else (tp,)
    parsed = _fit(parsed, tp)
    if str in args and parsed is not None and not isinstance(parsed, str):
        parsed = value  # keep '0123' or '1e3' verbatim for string fields
    if not _matches(parsed, tp):
        _fail(name, value, f"expected {_type_name(tp)}")
    return parsed


def apply_overrides(cfg: TrainerConfig, overrides: list[str]) -> TrainerConfig:
    """Apply ``section.field=value`` (any depth) overrides; returns a new validated config."""
    data = to_dict(cfg)
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not of the form section.field=value")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        node, cls = data, TrainerConfig
        for i, part in enumerate(parts):
            hints = typing.get_type_hints(cls)
            if part not in hints:
                where = ".".join(parts[:i]) or "<root>"
                raise ValueError(f"override {item!r}: no field '{part}' in section '{where}'; "
                                 f"known: {', '.join(sorted(hints))}")
            if i == len(parts) - 1:
                if dataclasses.is_dataclass(hints[part]):
                    raise ValueError(f"override {item!r}: '{key}' is a section, not a field")
                node[part] = _coerce(value, hints[part], key)
            else:
                if not dataclasses.is_dataclass(hints[part]):
                    raise ValueError(f"override {item!r}: '{part}' is a field, not a section")
                node, cls = node[part], hints[part]
    return from_dict(TrainerConfig, data)


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> TrainerConfig:
    """Load YAML (or defaults when ``path`` is None), apply overrides, then validate the result."""
    global _DEFER_VALIDATION
    _DEFER_VALIDATION = True
    try:
        cfg = _load_unvalidated(path, overrides)
    finally:
        _DEFER_VALIDATION = False
    try:
        validate(cfg)
    except ValueError as e:
        where = f"{path} + overrides" if path is not None and overrides else (path or "overrides")
        raise ValueError(f"{where}: {e}") from None
    return cfg


def _load_unvalidated(path, overrides) -> TrainerConfig:
    data: dict[str, Any] = {}
    if path is not None:
        try:
            with open(path) as f:
                data = yaml.safe_load(f) or {}
        except FileNotFoundError:
            raise FileNotFoundError(f"config file not found: {path}") from None
        except yaml.YAMLError as e:
            raise ValueError(f"config file {path} is not valid YAML: {e}") from None
        try:
            cfg = from_dict(TrainerConfig, data)
        except (ValueError, TypeError) as e:
            raise ValueError(f"{path}: {e}") from None
    else:
        cfg = TrainerConfig()
    return apply_overrides(cfg, overrides or [])


def format_config(cfg: TrainerConfig) -> str:
    """The resolved config as YAML text."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def save_config(cfg: TrainerConfig, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML (atomically)."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(format_config(cfg))
    os.replace(tmp, path)
