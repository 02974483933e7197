"""A decode KV cache that stores rotated keys and can drop finished rows.

Why not Megatron's ``StaticInferenceContext``: megatron-core 0.16.1 stores the keys *before*
RoPE and, on every decode step, re-applies RoPE to the whole cached key block of every layer
(``Attention._adjust_key_value_for_inference`` slices ``k_pos_emb[:sequence_end]``); with
GQA its ``DotProductAttention`` also ``repeat_interleave``s the whole cache. On SmolLM2-135M
(2-core CPU) that was 36% of decode time, and it grows with the sequence. Megatron avoids it
only under ``flash_decode`` (flash-attn's ``flash_attn_with_kvcache``) or the dynamic engine
(flash-attn >= 2.7.3), neither of which runs on CPU, and its static context has no way to
drop finished rows.

So the cache lives here, and only Megatron's *core attention* is intercepted: every other
part of each layer (norms, QKV and output projections with their tensor-parallel
communication, RoPE application, MLP, residuals) is Megatron's own code, called exactly as in
a training forward (``inference_context=None``). The trunk applies RoPE to the new tokens'
queries and keys only, with per-row angles the caller slices from one table.

* prefill: the core attention runs unchanged (with the caller's causal + padding mask); the
  already rotated keys and the values are copied into the cache.
* decode (one token per row): the new key/value is written at one slot for every row, and
  attention is computed over the cached slots, grouped-query without copying the cache:
  ``q [n, G, H/G, D] @ k [n, G, S, D]^T``.

Finished rows leave the batch by swap-remove (the last live rows move into the holes), so a
drop copies only as many cache rows as finished, not the whole cache.

Layout: ``buf [L, 2, B, G, S, D]`` (layer, key/value, cache row, local query group, slot, head
dim); a cache row's data of one layer is contiguous.
"""

from __future__ import annotations

import contextlib
import functools
import math

import torch


def index_tensor(values: list[int], device: torch.device) -> torch.Tensor:
    """A host list as an int64 index on ``device`` without a host sync (pinned, non-blocking on CUDA)."""
    t = torch.tensor(values, dtype=torch.long)
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def swap_remove_plan(n: int, dead: list[int]) -> tuple[int, list[int], list[int]]:
    """Which rows move where when the rows ``dead`` (positions in ``[0, n)``) leave the batch.

    Returns:
        ``(new_n, holes, sources)``: row ``sources[i]`` moves to ``holes[i]``; afterwards
        positions ``[0, new_n)`` hold exactly the live rows.
    """
    dead_set = set(dead)
    new_n = n - len(dead_set)
    holes = sorted(i for i in dead_set if i < new_n)
    sources = [i for i in range(new_n, n) if i not in dead_set]
    assert len(holes) == len(sources)
    return new_n, holes, sources


def decode_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     key_valid: torch.Tensor | None, scale: float) -> torch.Tensor:
    """Attention of one query token per row over cached keys, grouped-query, no cache copy.

    Args:
        query: ``[1, n, H, D]`` (Megatron layout, RoPE applied).
        key, value: ``[n, G, S, D]`` (views of the cache; RoPE applied to ``key``).
        key_valid: ``[n, S]`` bool, False on slots the query must not see; None = all.
        scale: softmax scale.

    Returns:
        ``[1, n, H * D]``, the layout Megatron's core attention returns.
    """
    n, G, S, D = key.shape
    H = query.shape[2]
    q = query[0].reshape(n, G, H // G, D)  # head h belongs to query group h // (H / G)
    return grouped_decode_attention(q, key, value, key_valid, scale).reshape(1, n, H * D)


def grouped_decode_attention(q: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             key_valid: torch.Tensor | None, scale: float) -> torch.Tensor:
    """:func:`decode_attention` on queries already grouped ``[n, G, H/G, D]`` (any strides);
    returns ``[n, G, H/G, D]``. Scores in fp32 (as Megatron's softmax in fp32)."""
    scores = torch.matmul(q, key.transpose(-1, -2)).float().mul_(scale)  # (n, G, H/G, S)
    if key_valid is not None:
        scores.masked_fill_(~key_valid[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(value.dtype)
    return torch.matmul(probs, value)


def lean_decode_unsupported(policy) -> str | None:
    """Why :meth:`KVCache.lean_trunk` cannot stand in for ``policy.trunk`` on this model (None: it can).

    The lean step covers exactly the layer structure ``models.gpt`` builds with the local spec
    (RMSNorm, fused QKV, GQA, RoPE over the whole head, SwiGLU MLP, no dropout at eval, optional
    QKV/linear biases, tensor parallelism without sequence parallelism). Anything else (Transformer
    Engine layers, FP8, q/k norms, MoE, ...) decodes through Megatron's own modules.
    """
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.identity_op import IdentityOp
    from megatron.core.transformer.mlp import MLP

    from carft_mega.models.gpt import RMSNorm

    cfg = policy.config
    checks = {
        "transformer_impl is not local": getattr(cfg, "transformer_impl", "local") != "local",
        "sequence parallelism": cfg.sequence_parallel,
        "not a gated SiLU MLP": not cfg.gated_linear_unit or cfg.activation_func is not torch.nn.functional.silu,
        "glu offset / clamp": getattr(cfg, "glu_linear_offset", 0.0) != 0.0
        or getattr(cfg, "activation_func_clamp_value", None) is not None,
        "fused activations": cfg.bias_activation_fusion or getattr(cfg, "use_te_activation_func", False),
        "interleaved / partial / latent RoPE": cfg.rotary_interleaved or getattr(cfg, "multi_latent_attention", False)
        or getattr(cfg, "no_rope_freq", None) is not None,
        "residual options": cfg.fp32_residual_connection or cfg.apply_residual_connection_post_layernorm,
        "output gate": getattr(cfg, "attention_output_gate", False),
        "fewer query groups than TP ranks": cfg.num_query_groups < cfg.tensor_model_parallel_size,
        "fp8": bool(getattr(cfg, "fp8", None)),
        "rotary table width != head dim": policy.rotary_table(1).shape[-1] != cfg.kv_channels,
        "no final norm": not isinstance(getattr(policy.gpt.decoder, "final_layernorm", None), RMSNorm),
    }
    for layer in policy.gpt.decoder.layers:
        att = layer.self_attention
        checks["layer structure"] = checks.get("layer structure", False) or not (
            isinstance(layer.input_layernorm, RMSNorm) and isinstance(layer.pre_mlp_layernorm, RMSNorm)
            and type(layer.mlp) is MLP and isinstance(layer.cross_attention, IdentityOp)
            and isinstance(att.linear_qkv, ColumnParallelLinear) and isinstance(att.linear_proj, RowParallelLinear)
            and isinstance(layer.mlp.linear_fc1, ColumnParallelLinear)
            and isinstance(layer.mlp.linear_fc2, RowParallelLinear)
            and all(getattr(att, n, None) is None or isinstance(getattr(att, n), IdentityOp)
                    for n in ("q_layernorm", "k_layernorm")))
    reasons = [k for k, v in checks.items() if v]
    return ", ".join(reasons) if reasons else None


def _rotate(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on the last dim, non-interleaved: the expression of Megatron's
    ``_apply_rotary_pos_emb_bshd`` (so the result is bit-identical), with cos/sin computed once."""
    t1, t2 = torch.chunk(t, 2, dim=-1)
    return (t * cos) + (torch.cat((-t2, t1), dim=-1) * sin)


def _column_linear(lin, x: torch.Tensor) -> torch.Tensor:
    """``ColumnParallelLinear`` forward (no gather): Megatron's ``matmul`` then bias."""
    out = torch.matmul(x, lin.weight.t())
    return out + lin.bias if lin.bias is not None else out


def _row_linear(lin, x: torch.Tensor, tp_group) -> torch.Tensor:
    """``RowParallelLinear`` forward: local ``matmul``, all-reduce over TP, then bias (also when
    Megatron returns it separately: the layer adds it before the residual)."""
    out = torch.matmul(x, lin.weight.t())
    if tp_group is not None:
        torch.distributed.all_reduce(out, group=tp_group)
    return out + lin.bias if lin.bias is not None else out


class KVCache:
    """Rotated-key KV cache for :func:`carft_mega.rollout.generate.generate`.

    Args:
        policy: the ``PolicyModel`` (its decoder layers' core attention is intercepted while
            :meth:`attached`).
        batch: rows (upper bound; the live ones are ``[0, n)``).
        max_len: slots per row.
    """

    def __init__(self, policy, batch: int, max_len: int):
        layers = policy.gpt.decoder.layers
        attn = layers[0].self_attention
        cfg = policy.config
        if getattr(cfg, "softmax_type", "vanilla") != "vanilla":
            raise NotImplementedError(f"decode attention supports softmax_type 'vanilla', got {cfg.softmax_type!r}")
        if getattr(cfg, "apply_query_key_layer_scaling", False):
            raise NotImplementedError("decode attention does not support apply_query_key_layer_scaling")
        self.groups = attn.num_query_groups_per_partition
        self.head_dim = attn.hidden_size_per_attention_head
        self.scale = cfg.softmax_scale if cfg.softmax_scale is not None else 1.0 / math.sqrt(self.head_dim)
        device = policy.gpt.embedding.word_embeddings.weight.device
        self.buf = torch.zeros((len(layers), 2, batch, self.groups, max_len, self.head_dim),
                               dtype=cfg.params_dtype, device=device)
        self.max_len = max_len
        self.n = batch
        self._layers = layers
        self._mode: str | None = None
        self._rows = slice(0, batch)
        self._offset = 0
        self._slot: int | torch.Tensor = 0
        self._kv_len = 0
        self._key_valid: torch.Tensor | None = None

    # ------------------------------------------------------------------ modes
    def prefill(self, rows: slice, offset: int) -> None:
        """The next trunk call is a prefill of cache rows ``rows`` written at slots ``offset..``."""
        self._mode, self._rows, self._offset = "prefill", rows, offset

    def decode(self, slot: int | torch.Tensor, kv_len: int, key_valid: torch.Tensor | None) -> None:
        """The next trunk call feeds one token per live row, cached at ``slot``.

        Args:
            slot: the slot written (an int, or a 1-element int64 tensor on the cache's device,
                for CUDA-graph replay).
            kv_len: attend over slots ``[0, kv_len)`` (``slot < kv_len``).
            key_valid: ``[n, kv_len]`` bool or None, see :func:`decode_attention`.
        """
        self._mode, self._slot, self._kv_len, self._key_valid = "decode", slot, kv_len, key_valid

    def drop(self, holes: list[int], sources: list[int], new_n: int, upto: int) -> None:
        """Apply a :func:`swap_remove_plan`: copy rows ``sources`` into ``holes`` (slots ``< upto``)."""
        if holes:
            h, s = index_tensor(holes, self.buf.device), index_tensor(sources, self.buf.device)
            self.buf[:, :, h, :, :upto] = self.buf[:, :, s, :, :upto]
        self.n = new_n

    # ------------------------------------------------------------------ the lean decode step
    @torch.no_grad()
    def lean_trunk(self, policy, tokens: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
        """``policy.trunk`` for one token per live row, without Megatron's per-module Python.

        On a CPU the decode step of a 135M model is dominated by Python: Megatron's layers make
        ~18k Python calls per step (TP wrappers, autograd-Function applies, config checks). This
        walks the same layers' weights with plain torch calls, in the same order and with the
        same expressions, so its output equals the module path's (tests/rollout compares them);
        :func:`lean_decode_unsupported` says when it applies. The state set by :meth:`decode`
        (slot, attended length, key mask) is used as by the hook.

        Args:
            tokens: ``(n,)`` int64, the token fed by each live row.
            freqs: ``(n, d)`` RoPE angles of their positions.

        Returns:
            ``[1, n, H]`` final-norm output (the LM-head input), as ``policy.trunk`` returns it.
        """
        gpt = policy.gpt
        n = tokens.shape[0]
        tp_group = policy.tp_group if policy.config.tensor_model_parallel_size > 1 else None
        hidden = gpt.embedding(input_ids=tokens[:, None], position_ids=None)  # (1, n, H), TP all-reduced
        dtype = hidden.dtype
        cos = (torch.cos(freqs) * 1.0).to(dtype)[:, None, None]  # (n, 1, 1, d), once for all layers
        sin = (torch.sin(freqs) * 1.0).to(dtype)[:, None, None]
        G, D = self.groups, self.head_dim
        kv = self._kv_len
        for i, layer in enumerate(self._layers):
            att = layer.self_attention
            g = att.num_attention_heads_per_partition // G
            x = layer.input_layernorm(hidden)
            qkv = _column_linear(att.linear_qkv, x).view(n, G, g + 2, D)  # per group: g queries, key, value
            qk = _rotate(qkv[:, :, :g + 1], cos, sin)  # (n, G, g + 1, D): RoPE on queries and key at once
            k_cache, v_cache = self.buf[i, 0], self.buf[i, 1]
            if isinstance(self._slot, int):
                k_cache[:n, :, self._slot] = qk[:, :, g]
                v_cache[:n, :, self._slot] = qkv[:, :, g + 1]
            else:
                k_cache[:n].index_copy_(2, self._slot, qk[:, :, g:g + 1])
                v_cache[:n].index_copy_(2, self._slot, qkv[:, :, g + 1:])
            ctx = grouped_decode_attention(qk[:, :, :g], k_cache[:n, :, :kv], v_cache[:n, :, :kv], self._key_valid,
                                           self.scale)  # (n, G, g, D)
            hidden = hidden + _row_linear(att.linear_proj, ctx.reshape(1, n, G * g * D), tp_group)
            x = layer.pre_mlp_layernorm(hidden)
            a, b = torch.chunk(_column_linear(layer.mlp.linear_fc1, x), 2, dim=-1)
            hidden = hidden + _row_linear(layer.mlp.linear_fc2, torch.nn.functional.silu(a) * b, tp_group)
        return gpt.decoder.final_layernorm(hidden)

    # ------------------------------------------------------------------ the hook
    @contextlib.contextmanager
    def attached(self):
        """Route every layer's core attention through this cache for the duration."""
        cores = [layer.self_attention.core_attention for layer in self._layers]
        for core in cores:
            if "forward" in core.__dict__:
                raise RuntimeError("a KV cache is already attached to this model")
        try:
            for i, core in enumerate(cores):
                core.forward = functools.partial(self._core_forward, i, type(core).forward.__get__(core))
            yield self
        finally:
            for core in cores:
                core.__dict__.pop("forward", None)
            self._mode = None

    def _core_forward(self, layer: int, orig, query, key, value, attention_mask, *args, **kwargs):
        k_cache, v_cache = self.buf[layer, 0], self.buf[layer, 1]  # (B, G, S, D)
        if self._mode == "prefill":
            s0, s1 = self._offset, self._offset + key.shape[0]
            k_cache[self._rows, :, s0:s1] = key.permute(1, 2, 0, 3)
            v_cache[self._rows, :, s0:s1] = value.permute(1, 2, 0, 3)
            return orig(query, key, value, attention_mask, *args, **kwargs)
        if self._mode != "decode" or key.shape[0] != 1:
            raise RuntimeError(f"KVCache: trunk called outside prefill/decode (mode {self._mode}, "
                               f"{key.shape[0]} tokens)")
        n = self.n
        if isinstance(self._slot, int):
            k_cache[:n, :, self._slot] = key[0]
            v_cache[:n, :, self._slot] = value[0]
        else:  # static shapes for CUDA-graph capture: the slot is a device tensor
            k_cache[:n].index_copy_(2, self._slot, key.permute(1, 2, 0, 3))
            v_cache[:n].index_copy_(2, self._slot, value.permute(1, 2, 0, 3))
        kv = self._kv_len
        return decode_attention(query, k_cache[:n, :, :kv], v_cache[:n, :, :kv], self._key_valid, self.scale)
