"""Architecture description shared by the Megatron builder and the HF <-> Megatron converter.

An :class:`ArchSpec` holds exactly what is needed to rebuild a decoder-only model (Llama,
CodeLlama, Qwen2/2.5, Mistral: RMSNorm, SwiGLU, RoPE, GQA, optional QKV bias, optional tied
embeddings) in either framework. It is written next to every Megatron checkpoint as JSON, so a
checkpoint can be rebuilt without the original HF directory.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Any, Literal

from carft_mega.config import TinyModelConfig

SUPPORTED_FAMILIES = ("llama", "qwen2", "mistral")

ARCH_JSON = "carft_arch.json"
"""File name of the architecture/tokenizer description inside a Megatron checkpoint directory."""


@dataclass(frozen=True, kw_only=True)
class ArchSpec:
    """A Llama-like decoder (the subset of HF configs this project converts)."""

    family: Literal["llama", "qwen2", "mistral"]
    """HF ``model_type``."""
    hidden_size: int
    """Hidden size H."""
    num_layers: int
    """Number of transformer layers."""
    num_heads: int
    """Query heads."""
    num_kv_heads: int
    """Key/value heads (GQA groups)."""
    head_dim: int
    """Channels per head (Megatron ``kv_channels``)."""
    ffn_hidden_size: int
    """SwiGLU intermediate size."""
    vocab_size: int
    """Real vocabulary size (rows of the HF embedding); Megatron pads it, see ``padded_vocab_size``."""
    max_position_embeddings: int
    """Longest sequence the rotary tables are built for."""
    rope_theta: float
    """RoPE base (10000 Llama-2, 1e6 CodeLlama / Qwen2, 1e5 SmolLM2)."""
    rms_norm_eps: float
    """RMSNorm epsilon."""
    qkv_bias: bool
    """Biases on q/k/v projections (Qwen2)."""
    tie_embeddings: bool
    """LM head shares the input embedding."""
    sliding_window: int | None = None
    """Mistral-style sliding-window attention width (None = full causal attention)."""

    def __post_init__(self) -> None:
        if self.family not in SUPPORTED_FAMILIES:
            raise ValueError(f"ArchSpec.family = {self.family!r}: supported are {SUPPORTED_FAMILIES}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"ArchSpec.num_kv_heads = {self.num_kv_heads}: must divide num_heads = {self.num_heads}")
        for name in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                     "ffn_hidden_size", "vocab_size", "max_position_embeddings"):
            if getattr(self, name) <= 0:
                raise ValueError(f"ArchSpec.{name} = {getattr(self, name)}: must be > 0")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ArchSpec":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown ArchSpec field(s): {unknown}")
        return cls(**data)

    def to_hf_config(self, **extra: Any):
        """The matching transformers config (``LlamaConfig`` / ``Qwen2Config`` / ``MistralConfig``).

        ``extra`` goes to the config constructor (token ids, ...).
        """
        import transformers

        common = dict(
            vocab_size=self.vocab_size, hidden_size=self.hidden_size,
            intermediate_size=self.ffn_hidden_size, num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads, num_key_value_heads=self.num_kv_heads,
            head_dim=self.head_dim, hidden_act="silu",
            max_position_embeddings=self.max_position_embeddings, rms_norm_eps=self.rms_norm_eps,
            tie_word_embeddings=self.tie_embeddings, attention_dropout=0.0,
        )
        common.update(_rope_kwargs(self.rope_theta))
        if self.family == "llama":
            if self.qkv_bias:
                raise ValueError("a Llama config cannot express QKV bias without an o_proj bias; "
                                 "use family='qwen2'")
            cfg = transformers.LlamaConfig(attention_bias=False, mlp_bias=False, **common, **extra)
        elif self.family == "qwen2":
            if not self.qkv_bias:
                raise ValueError("Qwen2 always has QKV bias; set qkv_bias=True or use family='llama'")
            # HF Qwen2 windows layer i when use_sliding_window and i >= max_window_layers:
            # max_window_layers=0 windows every layer (the only pattern an ArchSpec describes).
            windowed = self.sliding_window is not None
            cfg = transformers.Qwen2Config(
                use_sliding_window=windowed, sliding_window=self.sliding_window,
                max_window_layers=0 if windowed else self.num_layers, **common, **extra)
        else:
            if self.qkv_bias:
                raise ValueError("Mistral has no QKV bias")
            cfg = transformers.MistralConfig(sliding_window=self.sliding_window, **common, **extra)
        return cfg


def _rope_kwargs(theta: float) -> dict[str, Any]:
    """RoPE base in the form the installed transformers expects (v5: ``rope_parameters``)."""
    import transformers

    if int(transformers.__version__.split(".")[0]) >= 5:
        return {"rope_parameters": {"rope_type": "default", "rope_theta": float(theta)}}
    return {"rope_theta": float(theta)}


def _hf_rope(hf_cfg) -> tuple[float, str]:
    """(theta, rope_type) from a transformers v4 or v5 config."""
    params = getattr(hf_cfg, "rope_parameters", None)
    if isinstance(params, dict) and "rope_theta" in params:
        return float(params["rope_theta"]), params.get("rope_type", "default") or "default"
    scaling = getattr(hf_cfg, "rope_scaling", None) or {}
    rope_type = scaling.get("rope_type", scaling.get("type", "default")) if scaling else "default"
    return float(getattr(hf_cfg, "rope_theta", 10000.0)), rope_type


def _qwen2_window(hf_cfg, source: str) -> int | None:
    """The one sliding window of a Qwen2 config, or None for full attention on every layer.

    HF Qwen2 windows layer ``i`` when ``layer_types[i] == 'sliding_attention'`` (transformers
    v5 always sets ``layer_types``), i.e. when ``use_sliding_window`` and ``i >= max_window_layers``
    (v4, where ``layer_types`` may be absent). ``max_window_layers = num_hidden_layers`` therefore
    means full attention everywhere and ``max_window_layers = 0`` a window on every layer.

    Raises:
        ValueError: a mix of windowed and full-attention layers (one ArchSpec window cannot say it).
    """
    n = hf_cfg.num_hidden_layers
    width = getattr(hf_cfg, "sliding_window", None)
    types = getattr(hf_cfg, "layer_types", None)
    if types is not None:
        types = list(types)
        bad = sorted(set(types) - {"sliding_attention", "full_attention"})
        if len(types) != n or bad:
            raise ValueError(f"{source}: layer_types must list 'sliding_attention' / 'full_attention' for each of "
                             f"the {n} layers, got {types}")
        sliding = [t == "sliding_attention" for t in types]
        field = "layer_types"
    else:
        use = bool(getattr(hf_cfg, "use_sliding_window", False))
        first = getattr(hf_cfg, "max_window_layers", n)
        sliding = [use and i >= first for i in range(n)]
        field = "max_window_layers"
    if width is None or not any(sliding):
        return None  # HF attends fully when sliding_window is None, whatever the layer type
    if all(sliding):
        return int(width)
    windowed = [i for i, s in enumerate(sliding) if s]
    raise ValueError(f"{source}: Qwen2 {field} (use_sliding_window = {getattr(hf_cfg, 'use_sliding_window', None)}, "
                     f"max_window_layers = {getattr(hf_cfg, 'max_window_layers', None)}) puts the sliding window on "
                     f"layers {windowed} of {n} only; supported is a window on every layer "
                     f"(max_window_layers = 0) or on none")


def arch_from_hf_config(hf_cfg, source: str = "<config>") -> ArchSpec:
    """Describe an HF Llama / CodeLlama / Qwen2 / Qwen2.5 / Mistral config.

    Args:
        hf_cfg: a ``transformers.PretrainedConfig``.
        source: where the config came from (named in errors).

    Raises:
        NotImplementedError: for other architectures or features this project does not convert
            (RoPE scaling, attention/MLP biases other than Qwen2's QKV bias, non-SiLU MLP).
        ValueError: a Qwen2 sliding window on some layers only (see :func:`_qwen2_window`).
    """
    family = getattr(hf_cfg, "model_type", None)
    if family not in SUPPORTED_FAMILIES:
        raise NotImplementedError(f"{source}: model_type {family!r} is not supported "
                                  f"(supported: {', '.join(SUPPORTED_FAMILIES)})")
    theta, rope_type = _hf_rope(hf_cfg)
    if rope_type not in ("default", None):
        raise NotImplementedError(f"{source}: RoPE scaling type {rope_type!r} (config field 'rope_scaling' / "
                                  f"'rope_parameters') is not supported; only plain RoPE converts")
    act = getattr(hf_cfg, "hidden_act", "silu")
    if act != "silu":
        raise NotImplementedError(f"{source}: hidden_act {act!r} is not supported (SwiGLU needs 'silu')")
    if getattr(hf_cfg, "mlp_bias", False):
        raise NotImplementedError(f"{source}: mlp_bias=True is not supported")
    if family == "qwen2":
        qkv_bias = True
    else:
        if getattr(hf_cfg, "attention_bias", False):
            raise NotImplementedError(f"{source}: attention_bias=True (bias on o_proj too) is not supported")
        qkv_bias = False
    window = None
    if family == "mistral":
        window = getattr(hf_cfg, "sliding_window", None)
    elif family == "qwen2":
        window = _qwen2_window(hf_cfg, source)
    num_heads = hf_cfg.num_attention_heads
    head_dim = getattr(hf_cfg, "head_dim", None) or hf_cfg.hidden_size // num_heads
    return ArchSpec(
        family=family,
        hidden_size=hf_cfg.hidden_size,
        num_layers=hf_cfg.num_hidden_layers,
        num_heads=num_heads,
        num_kv_heads=getattr(hf_cfg, "num_key_value_heads", None) or num_heads,
        head_dim=head_dim,
        ffn_hidden_size=hf_cfg.intermediate_size,
        vocab_size=hf_cfg.vocab_size,
        max_position_embeddings=hf_cfg.max_position_embeddings,
        rope_theta=theta,
        rms_norm_eps=float(hf_cfg.rms_norm_eps),
        qkv_bias=qkv_bias,
        tie_embeddings=bool(getattr(hf_cfg, "tie_word_embeddings", False)),
        sliding_window=window,
    )


def arch_from_tiny(tiny: TinyModelConfig, vocab_size: int) -> ArchSpec:
    """Describe the tiny random model of ``model.tiny`` (Qwen2 gets its QKV bias)."""
    return ArchSpec(
        family=tiny.arch,
        hidden_size=tiny.hidden_size,
        num_layers=tiny.num_layers,
        num_heads=tiny.num_heads,
        num_kv_heads=tiny.num_kv_heads,
        head_dim=tiny.hidden_size // tiny.num_heads,
        ffn_hidden_size=tiny.ffn_hidden_size,
        vocab_size=vocab_size,
        max_position_embeddings=tiny.max_position_embeddings,
        rope_theta=tiny.rope_theta,
        rms_norm_eps=1e-6,
        qkv_bias=tiny.arch == "qwen2",
        tie_embeddings=tiny.tie_embeddings,
        sliding_window=None,
    )


def pad_vocab_size(vocab_size: int, tp: int, divisible_by: int = 128) -> int:
    """Rows of the Megatron embedding / output layer.

    Megatron-LM pads to a multiple of ``divisible_by * tp``, which makes the checkpoint's
    global shape depend on TP. We pad to a multiple of ``lcm(divisible_by, tp)`` instead: the
    same number for every power-of-two TP up to ``divisible_by``, so a checkpoint saved at TP=2
    loads at TP=1 and the other way round. The padding rows are zero and are stripped on export.
    """
    import math

    m = math.lcm(divisible_by, tp)
    return -(-vocab_size // m) * m


def write_arch_json(ckpt_dir: str | os.PathLike, arch: ArchSpec, padded_vocab_size: int,
                    tokenizer_dir: str | None = None, extra: dict[str, Any] | None = None) -> str:
    """Write ``carft_arch.json`` into a checkpoint directory (rank 0 only; atomic).

    Args:
        ckpt_dir: the dist_checkpointing directory.
        arch: the model architecture.
        padded_vocab_size: rows of the embedding in the checkpoint.
        tokenizer_dir: tokenizer directory relative to ``ckpt_dir`` (or absolute), or None.
        extra: more JSON-able fields (HF token ids, source path, ...).

    Returns:
        The path written.
    """
    data = {"format": "carft_mega/1", "arch": arch.to_dict(), "padded_vocab_size": padded_vocab_size,
            "tokenizer": tokenizer_dir}
    data.update(extra or {})
    path = os.path.join(os.fspath(ckpt_dir), ARCH_JSON)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
    os.replace(tmp, path)
    return path


def read_arch_json(ckpt_dir: str | os.PathLike) -> dict[str, Any]:
    """Read ``carft_arch.json``; returns the dict with ``arch`` as an :class:`ArchSpec`."""
    path = os.path.join(os.fspath(ckpt_dir), ARCH_JSON)
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} not found: {ckpt_dir} is not a carft_mega Megatron checkpoint "
                                f"(write one with tools/convert_hf_to_megatron.py)") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    try:
        data["arch"] = ArchSpec.from_dict(data["arch"])
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: bad 'arch' entry ({e})") from None
    return data
