"""The CARFT policy: a Megatron ``GPTModel`` trunk plus the shared-trunk CoT/value head.

Alignment convention (used by the whole package): **state-aligned**. For a row of tokens
``x_0 .. x_{T-1}``:

* ``logp[:, t] = log pi(x_{t+1} | x_{<=t})`` for ``t < T-1`` and ``logp[:, T-1] = 0``;
* ``values[:, t] = V(h_t)`` and ``entropy[:, t]`` is the entropy of the distribution at ``t``;
* span masks are token-aligned: ``span_masks[k, b, t]`` selects the hidden state ``h_t``.

Megatron's model code is sequence-major (``[s, b, h]``); everything this module returns is
batch-major (``[b, s]``). The one place where the layout changes is :func:`megatron_to_batch_major`.
"""

from __future__ import annotations

import contextlib
import math
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

from carft_mega.models.arch import ArchSpec
from carft_mega.models.logprobs import vocab_parallel_logprobs


@dataclass
class PolicyOutput:
    """What :meth:`PolicyModel.forward` returns (all batch-major)."""

    logp: torch.Tensor | None
    """``[B, T]`` fp32 next-token log-probs (state-aligned; 0 at ``T-1``), None if not asked for."""
    values: torch.Tensor
    """``[B, T]`` fp32 values ``V(h_t)``."""
    z: torch.Tensor | None
    """``[K, B, d]`` fp32 pooled CoT embeddings (paper Eq. 6), None without span masks."""
    z_valid: torch.Tensor | None
    """``[K, B]`` bool, False where the span mask was empty (then ``z`` is 0)."""
    entropy: torch.Tensor | None
    """``[B, T]`` fp32 entropy of the next-token distribution, None if not asked for."""


def cpu_shim_suspended():
    """The CPU shim's device-remapping mode off for a forward (``_cpu_shim.suspended``): it costs
    a Python call per torch call and the forward needs none of its rewrites. A no-op on a GPU
    box, where the shim is never imported."""
    shim = sys.modules.get("carft_mega._cpu_shim")
    return shim.suspended() if shim is not None else contextlib.nullcontext()


def megatron_to_batch_major(x: torch.Tensor) -> torch.Tensor:
    """The layout boundary: Megatron ``[s, b, ...]`` -> RL ``[b, s, ...]``.

    Every tensor this module hands to RL code passes through here (STYLE.md rule 12).
    """
    return x.transpose(0, 1)


def left_pad_position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that start at 0 on each row's first real token.

    Args:
        attention_mask: ``[B, T]`` bool, True on real tokens (left padding: False first).

    Returns:
        ``[B, T]`` int64; padding positions get 0.
    """
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def build_attention_mask(key_mask: torch.Tensor, q_len: int | None = None,
                         sliding_window: int | None = None) -> torch.Tensor:
    """Causal + key-padding (+ sliding-window) mask in Megatron's convention (True = masked out).

    The query positions are the last ``q_len`` of the ``T_k`` key positions (``q_len = T_k`` for a
    full forward; 1 for a KV-cache decode step). A query on a padding position keeps at least
    its own key so no softmax row is empty (its output is never used).

    Args:
        key_mask: ``[B, T_k]`` bool, True on real tokens.
        q_len: number of query positions (default ``T_k``).
        sliding_window: a query at ``i`` sees keys ``j`` with ``i - sliding_window < j <= i``.

    Returns:
        ``[B, 1, q_len, T_k]`` bool.
    """
    b, tk = key_mask.shape
    q_len = tk if q_len is None else q_len
    i = torch.arange(tk - q_len, tk, device=key_mask.device)[:, None]  # (q, 1) absolute query pos
    j = torch.arange(tk, device=key_mask.device)[None, :]  # (1, T_k)
    allowed = j <= i
    if sliding_window is not None:
        allowed = allowed & (j > i - sliding_window)
    allowed = allowed[None] & key_mask[:, None, :].bool()  # (B, q, T_k)
    allowed = allowed | (j == i)[None]
    return ~allowed[:, None]


class CoTHead(torch.nn.Module):
    """Shared-trunk CoT/value head (authors' ValueHeadV2, DESIGN.md Sec. 2), replicated on TP ranks.

    ``e_t = proj(h_t)`` (``Linear(H, d)``, the CoT token embedding) and
    ``V_t = summary(relu(e_t))`` (``Linear(d, 1)``). Parameters: ``proj.weight [d, H]``,
    ``proj.bias [d]``, ``summary.weight [1, d]``, ``summary.bias [1]``.

    Initialised like ``nn.Linear`` from a generator seeded with ``seed``, so every TP (and DP)
    rank starts from the same weights without using the TP-forked RNG. Its inputs are identical
    on every TP rank (the full sequence is gathered first under sequence parallelism), so its
    gradients are identical too and need no TP reduction.
    """

    def __init__(self, hidden_size: int, proj_dim: int, *, seed: int, dtype: torch.dtype,
                 device: torch.device | str | None = None):
        super().__init__()
        self.proj = torch.nn.Linear(hidden_size, proj_dim, dtype=dtype, device=device)
        self.summary = torch.nn.Linear(proj_dim, 1, dtype=dtype, device=device)
        self.reset_parameters(seed)

    @torch.no_grad()
    def reset_parameters(self, seed: int) -> None:
        """``nn.Linear``'s default init (Kaiming-uniform weight, uniform bias), from a seeded generator."""
        g = torch.Generator(device="cpu").manual_seed(seed)
        for lin in (self.proj, self.summary):
            w = torch.empty(lin.weight.shape, dtype=torch.float32)
            torch.nn.init.kaiming_uniform_(w, a=math.sqrt(5), generator=g)
            bound = 1.0 / math.sqrt(lin.in_features)
            b = torch.empty(lin.bias.shape, dtype=torch.float32).uniform_(-bound, bound, generator=g)
            lin.weight.copy_(w)
            lin.bias.copy_(b)

    def forward(self, h: torch.Tensor, span_masks: torch.Tensor, impl: str = "auto"):
        """Values and pooled embeddings through the fused op ``carft_mega.ops.cot_head``.

        Args:
            h: ``[B, T, H]`` final hidden states (batch-major; any strides).
            span_masks: ``[K, B, T]`` bool (K may be 0).
            impl: the op's implementation: 'auto', 'triton' or 'ref'.

        Returns:
            ``(V [B, T] fp32, z [K, B, d] fp32, valid [K, B] bool)``.
        """
        from carft_mega.ops.cot_head import cot_head

        return cot_head(h, self.proj.weight, self.proj.bias, self.summary.weight.reshape(-1),
                        self.summary.bias.reshape(()), span_masks, impl=impl)


class PolicyModel(torch.nn.Module):
    """``GPTModel`` + :class:`CoTHead`; usable inside Megatron DDP and dist_checkpointing.

    Submodules: ``gpt`` (Megatron ``GPTModel``) and ``cot_head``. The checkpoint keys of the GPT
    part are Megatron's own (no ``gpt.`` prefix), so a converted checkpoint is a standard
    Megatron GPT checkpoint plus ``cot_head.*``.

    Args:
        gpt: the Megatron model (built by ``models.gpt.build_gpt_model``).
        arch: its architecture (real vocabulary size, sliding window).
        cot_proj_dim: ``d`` of the CoT head.
        head_seed: initialisation seed of the CoT head (same on every rank).
        kernels: ``model.kernels``, the ``impl`` of the fused CoT head op: 'auto' (the Triton
            kernel on CUDA tensors, the reference otherwise), 'ref', or 'triton' (tests: the
            kernel in the interpreter); ``carft_mega.ops.dispatch`` decides.
        head_trunk_grad_scale: ``model.head_trunk_grad_scale``: the factor on the gradient the CoT
            head (value and contrastive losses) sends into the trunk; 1 = the authors' shared
            trunk, 0 = the head trains on frozen features.
    """

    def __init__(self, gpt, arch: ArchSpec, *, cot_proj_dim: int = 64, head_seed: int = 1234,
                 kernels: str = "auto", head_trunk_grad_scale: float = 1.0):
        super().__init__()
        self.head_trunk_grad_scale = head_trunk_grad_scale
        if kernels not in ("auto", "ref", "triton"):
            raise ValueError(f"config field 'model.kernels' = {kernels!r}: expected auto or ref")
        self.kernels = kernels
        self.gpt = gpt
        self.config = gpt.config
        self.model_type = gpt.model_type  # Megatron's schedules look these two up on the model
        self.arch = arch
        self.hf_token_ids: dict[str, int] = {}
        """bos/eos/pad ids of the HF model this policy came from (empty when unknown, e.g. tiny);
        saved in ``carft_arch.json`` so an HF export gets them back."""
        device = gpt.embedding.word_embeddings.weight.device
        self.cot_head = CoTHead(arch.hidden_size, cot_proj_dim, seed=head_seed, dtype=self.config.params_dtype,
                                device=device)

    # ---------------------------------------------------------------- process groups / shapes
    @property
    def tp_group(self) -> dist.ProcessGroup:
        """The TP group this model was built with (Megatron's ``pg_collection.tp``)."""
        return self.gpt.pg_collection.tp

    @property
    def vocab_size(self) -> int:
        """Real vocabulary size (the padded rows of the embedding are never predicted)."""
        return self.arch.vocab_size

    @property
    def padded_vocab_size(self) -> int:
        return self.gpt.vocab_size

    def set_input_tensor(self, input_tensor) -> None:
        """Megatron's schedules call this (pipeline parallelism; a no-op input here)."""
        self.gpt.set_input_tensor(input_tensor)

    # ---------------------------------------------------------------- the trunk
    def rotary_table(self, length: int) -> torch.Tensor:
        """RoPE angles of positions ``0..length-1``: ``[length, d]`` fp32 on the model's device.

        Megatron's ``RotaryEmbedding`` memoises its table per length, so asking for at least
        ``max_position_embeddings`` rows always returns the same cached tensor: a generation
        builds nothing per step, it indexes this table.
        """
        rope = self.gpt.rotary_pos_emb
        return rope(max(length, self.arch.max_position_embeddings))[:length, 0, 0]

    def rotary_for_positions(self, position_ids: torch.Tensor | None, seq_len: int,
                             table: torch.Tensor | None = None) -> torch.Tensor:
        """RoPE angles for explicit per-row positions.

        Megatron's ``GPTModel`` uses positions ``0..s-1`` for every row; left-padded rows need
        their own positions, so the table ``[P, d]`` is indexed per row.

        Args:
            position_ids: ``[B, S]`` int64 or None (positions ``0..seq_len-1`` for every row).
            seq_len: ``S`` when ``position_ids`` is None.
            table: a :meth:`rotary_table` covering every position in ``position_ids`` (saves the
                host sync that finds the largest position); None builds (or reuses) one.

        Returns:
            ``[S, B, 1, d]`` (or ``[S, 1, 1, d]`` when ``position_ids`` is None).
        """
        if position_ids is None:
            if table is None:
                table = self.rotary_table(seq_len)
            return table[:seq_len, None, None]
        if table is None:
            need = int(position_ids.max().item()) + 1 if position_ids.numel() else 1
            table = self.rotary_table(need)
        return table[position_ids.t()].unsqueeze(2)  # (S, B, 1, d)

    def trunk(self, tokens: torch.Tensor, *, position_ids: torch.Tensor | None = None,
              attention_mask: torch.Tensor | None = None, inference_context=None,
              rotary_position_ids: torch.Tensor | None = None,
              rotary_pos_emb: torch.Tensor | None = None) -> torch.Tensor:
        """Embedding, transformer layers and final norm: the LM-head input ``h``.

        Args:
            tokens: ``[B, S]`` int64.
            position_ids: ``[B, S]`` positions of these tokens (None: ``0..S-1``).
            attention_mask: ``[B, 1, S_q, S_k]`` bool, True = masked out (see
                :func:`build_attention_mask`); None = causal.
            inference_context: a Megatron ``StaticInferenceContext`` for KV-cache decoding.
                Megatron slices the rotary table by absolute cache slot, so then pass
                ``rotary_position_ids [B, max_sequence_length]`` (the position of every cache
                slot of every row) instead of ``position_ids``. (``rollout.generate`` uses its
                own cache, ``rollout.kv_cache``, and passes ``rotary_pos_emb`` instead.)
            rotary_position_ids: see ``inference_context``.
            rotary_pos_emb: precomputed RoPE angles of these tokens, ``[S, B, 1, d]`` or
                ``[S, 1, 1, d]`` (rows of :meth:`rotary_table`); overrides ``position_ids`` and
                ``rotary_position_ids``.

        Returns:
            ``[S, B, H]`` in Megatron's sequence-major layout (``[S/tp, B, H]`` under sequence
            parallelism).
        """
        gpt = self.gpt
        with cpu_shim_suspended():
            hidden = gpt.embedding(input_ids=tokens, position_ids=None)  # (S, B, H), SP-scattered if SP
            if rotary_pos_emb is not None:
                rotary = rotary_pos_emb
            elif inference_context is not None:
                if rotary_position_ids is None:
                    rotary = self.rotary_for_positions(None, inference_context.max_sequence_length)
                else:
                    rotary = self.rotary_for_positions(rotary_position_ids, rotary_position_ids.shape[1])
            else:
                rotary = self.rotary_for_positions(position_ids, tokens.shape[1])
            return gpt.decoder(hidden_states=hidden, attention_mask=attention_mask,
                               inference_context=inference_context, rotary_pos_emb=rotary)

    def lm_logits(self, hidden: torch.Tensor, gather: bool = False) -> torch.Tensor:
        """Output layer on trunk output.

        Args:
            hidden: ``[S, B, H]`` (sequence-sharded under SP; the layer gathers it).
            gather: gather the vocabulary over TP (decoding); False keeps ``[S, B, V_pad/tp]``.

        Returns:
            ``[S, B, V_pad/tp]`` (or ``[S, B, V_pad]`` with ``gather``) logits in the model dtype;
            columns ``>= vocab_size`` are padding and must be ignored.
        """
        gpt = self.gpt
        weight = gpt.shared_embedding_or_output_weight() if gpt.share_embeddings_and_output_weights else None
        with cpu_shim_suspended():
            logits, _ = gpt.output_layer(hidden, weight=weight, runtime_gather_output=gather)
        return logits

    def _gather_sequence(self, hidden: torch.Tensor) -> torch.Tensor:
        """Under SP, all-gather the sequence for the replicated head (backward: keep own slice)."""
        if not self.config.sequence_parallel:
            return hidden
        from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region

        return gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=False,
                                                    group=self.tp_group)

    # ---------------------------------------------------------------- forward
    def forward(self, tokens: torch.Tensor, *, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, span_masks: torch.Tensor | None = None,
                need_logp: bool = True, need_entropy: bool = False, temperature: float = 1.0) -> PolicyOutput:
        """Log-probs, values, pooled CoT embeddings and entropy of a batch.

        Args:
            tokens: ``[B, T]`` int64.
            attention_mask: ``[B, T]`` bool, True on real tokens; rows may be left-padded. None =
                every row is real from position 0 (causal attention only).
            position_ids: ``[B, T]`` int64; default 0 at each row's first real token.
            span_masks: ``[K, B, T]`` bool token-aligned spans to pool (None: no pooling).
            need_logp: compute next-token log-probs; False skips the output layer entirely.
            need_entropy: compute the entropy (implies the output layer).
            temperature: log-probs and entropy are those of ``softmax(logits / temperature)``, the
                distribution a rollout at that temperature samples from (DESIGN.md Sec. 6).

        Returns:
            :class:`PolicyOutput` (state-aligned, batch-major, see module docstring).
        """
        if tokens.dim() != 2:
            raise ValueError(f"tokens must be [B, T], got {tuple(tokens.shape)}")
        B, T = tokens.shape
        if attention_mask is not None and attention_mask.shape != tokens.shape:
            raise ValueError(f"attention_mask {tuple(attention_mask.shape)} != tokens {tuple(tokens.shape)}")
        if span_masks is not None and (span_masks.dim() != 3 or span_masks.shape[1:] != tokens.shape):
            raise ValueError(f"span_masks must be [K, {B}, {T}], got {tuple(span_masks.shape)}")
        tp = self.config.tensor_model_parallel_size

        # Sequence parallelism splits S over TP: right-pad to a multiple of tp. Causal attention
        # means the padding never influences the real positions; outputs are cut back to T.
        pad = (-T) % tp if self.config.sequence_parallel else 0
        if pad:
            tokens = torch.nn.functional.pad(tokens, (0, pad))
            if attention_mask is not None:
                attention_mask = torch.nn.functional.pad(attention_mask, (0, pad), value=False)
            if position_ids is not None:
                position_ids = torch.nn.functional.pad(position_ids, (0, pad))
            if span_masks is not None:
                span_masks = torch.nn.functional.pad(span_masks, (0, pad), value=False)
        S = T + pad

        mask4d = None
        if attention_mask is not None:
            attention_mask = attention_mask.bool()
            if position_ids is None:
                position_ids = left_pad_position_ids(attention_mask)
        if self.config.transformer_impl == "transformer_engine":
            # TE's 'padding_causal' kernels take the key-padding mask [B, 1, 1, S] (True = padding)
            # and apply causality themselves (untested here: no TE on the CPU machines).
            key = attention_mask if attention_mask is not None else torch.ones_like(tokens, dtype=torch.bool)
            mask4d = ~key[:, None, None, :]
        elif attention_mask is not None:
            mask4d = build_attention_mask(attention_mask, sliding_window=self.arch.sliding_window)
        elif self.arch.sliding_window is not None and S > self.arch.sliding_window:
            mask4d = build_attention_mask(torch.ones_like(tokens, dtype=torch.bool),
                                          sliding_window=self.arch.sliding_window)

        hidden = self.trunk(tokens, position_ids=position_ids, attention_mask=mask4d)  # (S[/tp], B, H)

        # CoT head on the full sequence, batch-major.
        h_full = megatron_to_batch_major(self._gather_sequence(hidden))  # (B, S, H)
        if self.head_trunk_grad_scale != 1.0 and h_full.requires_grad:
            # Same values; the head's gradient into the trunk is multiplied by the scale.
            a = self.head_trunk_grad_scale
            h_full = a * h_full + (1.0 - a) * h_full.detach()
        if span_masks is None:
            masks = torch.zeros((0, B, S), dtype=torch.bool, device=tokens.device)
        else:
            masks = span_masks.bool()
        values, z, z_valid = self.cot_head(h_full, masks, impl=self.kernels)
        values = values[:, :T]

        logp = entropy = None
        if need_logp or need_entropy:
            logits = self.lm_logits(hidden)  # (S, B, V_pad/tp)
            v_local = logits.shape[-1]
            vocab_start = dist.get_rank(self.tp_group) * v_local if tp > 1 else 0
            targets = torch.roll(tokens, shifts=-1, dims=1)
            targets[:, -1] = 0  # (B, S): next token; the last one is a dummy, zeroed below
            # Targets go to the logits' [S, B] layout (not the logits to [B, S]: that would copy them).
            lp, ent = vocab_parallel_logprobs(logits, targets.t(), tp_group=self.tp_group,
                                              vocab_start=vocab_start, vocab_size=self.vocab_size,
                                              need_entropy=need_entropy, temperature=temperature)
            if need_logp:
                # State-aligned: nothing follows position T-1, its log-prob is 0.
                logp = torch.nn.functional.pad(megatron_to_batch_major(lp)[:, :T - 1], (0, 1))
            if need_entropy:
                entropy = megatron_to_batch_major(ent)[:, :T]
        if span_masks is None:
            z = z_valid = None
        return PolicyOutput(logp=logp, values=values, z=z, z_valid=z_valid, entropy=entropy)

    # ---------------------------------------------------------------- checkpointing
    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None):
        """Megatron sharded state dict: the GPT part under Megatron's own keys, plus the head.

        The dict keys follow this module's ``state_dict`` names (``gpt.*``, ``cot_head.*``) so
        ``load_state_dict`` takes what ``dist_checkpointing.load`` returns; the checkpoint keys
        (``ShardedTensor.key``) of the GPT part carry no ``gpt.`` prefix.
        """
        from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

        gpt_sd = self.gpt.sharded_state_dict(prefix, sharded_offsets, metadata)
        out = {f"{prefix}gpt.{k[len(prefix):]}": v for k, v in gpt_sd.items()}
        head_sd = self.cot_head.state_dict(keep_vars=True)  # replicated: no TP axis
        dp_cp = (metadata or {}).get("dp_cp_group")
        if dp_cp is None:
            from megatron.core import parallel_state

            dp_cp = parallel_state.get_data_parallel_group(with_context_parallel=True)
        out.update(make_sharded_tensors_for_checkpoint(head_sd, f"{prefix}cot_head.", {}, sharded_offsets,
                                                       tp_group=self.tp_group, dp_cp_group=dp_cp))
        return out
