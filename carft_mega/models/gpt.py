"""Megatron-Core ``GPTModel`` for Llama / Qwen2 / Mistral, built from an :class:`ArchSpec`.

``build_transformer_config`` is the single place where a Megatron ``TransformerConfig`` is made
(STYLE.md rule 14). ``build_gpt_model`` picks the layer spec: Transformer Engine's when
``transformer_engine`` imports (or is asked for), else Megatron's local spec with this module's
:class:`RMSNorm` (Megatron's torch-norm fallback refuses sequence parallelism; ours tags its
weight ``sequence_parallel`` so ``finalize_model_grads`` all-reduces it over TP, as Megatron's
fused norms do).
"""

from __future__ import annotations

import dataclasses
import importlib.util
from typing import Literal

import torch
import torch.nn.functional as F

from carft_mega.models.arch import ArchSpec

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_dtype(dtype: str) -> torch.dtype:
    """``model.dtype`` -> torch dtype; 'auto' is bf16 with CUDA and fp32 without."""
    if dtype == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    try:
        return DTYPES[dtype]
    except KeyError:
        raise ValueError(f"config field 'model.dtype' = {dtype!r}: expected auto, bf16, fp16 or fp32") from None


def resolve_transformer_impl(impl: str) -> Literal["local", "transformer_engine"]:
    """``model.transformer_impl`` -> the spec to use; 'auto' = TE when it imports, else local."""
    have_te = importlib.util.find_spec("transformer_engine") is not None
    if impl == "auto":
        return "transformer_engine" if have_te else "local"
    if impl == "transformer_engine" and not have_te:
        raise ValueError("config field 'model.transformer_impl' = 'transformer_engine': "
                         "transformer_engine is not installed (pip install carft_mega[gpu])")
    if impl not in ("local", "transformer_engine"):
        raise ValueError(f"config field 'model.transformer_impl' = {impl!r}: expected auto, local or transformer_engine")
    return impl


class RMSNorm(torch.nn.Module):
    """RMSNorm computed as HF Llama/Qwen2 do (fp32 statistics, cast, then scale).

    Built by Megatron's ``build_module`` from the layer spec, hence the ``config`` argument. With
    sequence parallelism the input is sequence-sharded, so each TP rank sees a different part
    of the batch: the weight is tagged ``sequence_parallel`` and Megatron's
    ``finalize_model_grads`` sums its gradient over the TP group.

    Args:
        config: the Megatron ``TransformerConfig``.
        hidden_size: normalised dimension.
        eps: epsilon inside the root.
    """

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **_unused):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype,
                                                    device=None if config.use_cpu_initialization else _device()))
        if config.sequence_parallel:
            self.weight.sequence_parallel = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: ``[..., H]`` -> same shape and dtype."""
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def build_transformer_config(
    arch: ArchSpec,
    *,
    tp: int,
    sequence_parallel: bool = False,
    dtype: torch.dtype = torch.float32,
    fp8: bool = False,
    recompute: bool = False,
    transformer_impl: Literal["local", "transformer_engine"] = "local",
):
    """The Megatron ``TransformerConfig`` of ``arch`` (the only place one is built).

    Choices and why:
      * dropout 0 (RL fine-tuning; ReFT/CARFT disable dropout);
      * ``apply_rope_fusion``, ``persist_layer_norm``, ``gradient_accumulation_fusion``,
        ``bias_activation_fusion``, ``masked_softmax_fusion``, ``bias_dropout_fusion`` off: they
        need TE/Apex/CUDA extensions that are absent on CPU and on plain GPU boxes, and with no
        bias and no dropout there is nothing for them to fuse;
      * softmax in fp32 (as HF's eager attention), no query-key layer scaling;
      * weights are never initialised here (``perform_initialization=False``): every builder
        loads converted weights, which keeps the model independent of TP and fast to build;
      * FP8 only with Transformer Engine (``fp8='hybrid'``, delayed scaling).

    Args:
        arch: architecture.
        tp: tensor-parallel size.
        sequence_parallel: Megatron sequence parallelism (tp > 1).
        dtype: parameter and compute dtype.
        fp8: FP8 GEMMs (needs ``transformer_impl='transformer_engine'``).
        recompute: full activation recomputation of every layer.
        transformer_impl: 'local' or 'transformer_engine'.
    """
    from megatron.core.transformer import TransformerConfig

    if fp8 and transformer_impl != "transformer_engine":
        raise ValueError("config field 'model.fp8' = True: needs model.transformer_impl='transformer_engine'")
    if sequence_parallel and tp == 1:
        raise ValueError("config field 'parallel.sequence_parallel' = True: needs parallel.tp > 1")
    if arch.num_kv_heads % tp:
        raise ValueError(f"config field 'parallel.tp' = {tp}: must divide the number of KV heads "
                         f"({arch.num_kv_heads}) of this {arch.family} model")
    if arch.ffn_hidden_size % tp:
        raise ValueError(f"config field 'parallel.tp' = {tp}: must divide ffn_hidden_size ({arch.ffn_hidden_size})")
    recompute_kw = dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1) \
        if recompute else {}
    fp8_kw = dict(fp8="hybrid", fp8_recipe="delayed") if fp8 else {}
    return TransformerConfig(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        num_attention_heads=arch.num_heads,
        num_query_groups=arch.num_kv_heads,
        kv_channels=arch.head_dim,
        ffn_hidden_size=arch.ffn_hidden_size,
        normalization="RMSNorm",
        layernorm_epsilon=arch.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=arch.qkv_bias,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        attention_softmax_in_fp32=True,
        apply_query_key_layer_scaling=False,
        tensor_model_parallel_size=tp,
        sequence_parallel=sequence_parallel,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        bias_dropout_fusion=False,
        perform_initialization=False,
        use_cpu_initialization=not torch.cuda.is_available(),
        transformer_impl=transformer_impl,
        **recompute_kw,
        **fp8_kw,
    )


def _local_layer_spec():
    """Megatron's local GPT layer spec with :class:`RMSNorm` in place of the torch-norm fallback."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    spec = get_gpt_layer_local_spec(normalization="RMSNorm")
    spec.submodules = dataclasses.replace(spec.submodules, input_layernorm=RMSNorm, pre_mlp_layernorm=RMSNorm)
    return spec


def _te_layer_spec():
    """Transformer Engine's GPT layer spec; attention takes a padding mask (left-padded rows)."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec
    from megatron.core.transformer.enums import AttnMaskType

    spec = get_gpt_layer_with_transformer_engine_spec()
    spec.submodules.self_attention.params = dict(spec.submodules.self_attention.params,
                                                 attn_mask_type=AttnMaskType.padding_causal)
    return spec


def build_gpt_model(arch: ArchSpec, tconfig, padded_vocab_size: int, *, pg_collection=None):
    """Megatron ``GPTModel`` (uninitialised weights; load them with ``models.convert``).

    Args:
        arch: architecture (RoPE base, tied embeddings, positions).
        tconfig: from :func:`build_transformer_config`.
        padded_vocab_size: rows of the embedding / output layer (see ``arch.pad_vocab_size``).
        pg_collection: Megatron process groups; None = the global parallel state.
    """
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

    if padded_vocab_size < arch.vocab_size or padded_vocab_size % tconfig.tensor_model_parallel_size:
        raise ValueError(f"padded_vocab_size {padded_vocab_size} must be >= vocab_size {arch.vocab_size} "
                         f"and divisible by tp={tconfig.tensor_model_parallel_size}")
    if tconfig.transformer_impl == "transformer_engine":
        if arch.sliding_window is not None:
            raise NotImplementedError("sliding-window attention is implemented for the local spec only")
        spec = _te_layer_spec()
    else:
        spec = TransformerBlockSubmodules(layer_specs=[_local_layer_spec()] * arch.num_layers, layer_norm=RMSNorm)
    kwargs = {} if pg_collection is None else {"pg_collection": pg_collection}
    return GPTModel(
        config=tconfig,
        transformer_layer_spec=spec,
        vocab_size=padded_vocab_size,
        max_sequence_length=arch.max_position_embeddings,
        pre_process=True,
        post_process=True,
        parallel_output=True,
        share_embeddings_and_output_weights=arch.tie_embeddings,
        position_embedding_type="rope",
        rotary_percent=1.0,
        rotary_base=arch.rope_theta,
        **kwargs,
    )
