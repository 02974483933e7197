"""Batched KV-cache generation on the Megatron policy (sampling for rollouts, greedy for eval).

Prompts arrive left-padded (``data.collate_prompts``). Two decoding layouts:

* ``left`` (default with the local attention spec): prefill with a causal + padding mask, then
  decode one token per step; each row's rotary positions start at 0 on its first real token,
  so a padded row computes exactly what it would alone. The prefill runs in length buckets
  (:func:`plan_prefill_buckets`) so that short prompts are not padded to the longest one; every
  row's prompt still ends at the same cache slot.
* ``aligned`` (used with Transformer Engine attention, which ignores an explicit padding mask
  under a causal mask type): prompts are left-aligned, the prefill covers the shortest prompt,
  and longer prompts are fed token by token in place of samples until they end (Megatron's own
  static-batch scheme). No attention mask is needed in the prefill.

Decoding (both layouts) uses :mod:`carft_mega.rollout.kv_cache`: keys are cached after RoPE,
the RoPE table is built once per generation and indexed per step, and rows that emitted EOS
leave the batch and its cache (swap-remove), so late steps cost what their live rows cost.
One host sync per step (which rows finished). Optionally, on a GPU, the decode step is
replayed from a CUDA graph (``decode="cuda_graph"``).

The tokens do not depend on any of this (:class:`_Selector`): greedy picks depend on a row's
own logits; with a :class:`~carft_mega.rollout.sampling.RowNoise` (the trainer's rollouts) a
row's uniform depends on (seed, its global row id, its generation step) only, so only the live
rows are sampled, and a row's tokens are the same whatever batch it is in; with a plain
``torch.Generator`` the full batch is drawn every step. tests/rollout checks greedy equality
with a no-cache loop, both layouts, and sampled equality with and without compaction and across
batch splits. Tensor-parallel ranks gather the vocabulary for sampling and use the same seed,
so they pick the same tokens (and drop the same rows). The result is converted to left-aligned
rows (prompt, generation, padding): the layout of every training forward, which then needs no
attention mask.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from carft_mega.rollout.kv_cache import KVCache, index_tensor, lean_decode_unsupported, swap_remove_plan
from carft_mega.rollout.sampling import RowNoise, select_next


@dataclass
class RolloutBatch:
    """Left-aligned rows: ``tokens[b] = prompt (prompt_lens[b]) + generation (gen_lens[b]) + pad``.

    Attributes:
        tokens: ``(B, L)`` int64.
        prompt_lens: ``(B,)`` int64.
        gen_lens: ``(B,)`` int64, generated tokens including the EOS when one was emitted.
        finished: ``(B,)`` bool, True where the row ended with EOS (False: length limit).
        sample_logp: ``(B, L)`` fp32, state-aligned log-prob of each generated token under the
            unfiltered sampling-time distribution (0 elsewhere); a diagnostic, PPO recomputes it.
    """

    tokens: torch.Tensor
    prompt_lens: torch.Tensor
    gen_lens: torch.Tensor
    finished: torch.Tensor
    sample_logp: torch.Tensor

    @property
    def lengths(self) -> torch.Tensor:
        """``(B,)`` real tokens per row."""
        return self.prompt_lens + self.gen_lens

    def gen_span(self) -> torch.Tensor:
        """``(B, L)`` bool, token-aligned: the generated tokens (the rollout CoT span)."""
        pos = torch.arange(self.tokens.shape[1], device=self.tokens.device)[None]
        return (pos >= self.prompt_lens[:, None]) & (pos < self.lengths[:, None])

    def action_mask(self) -> torch.Tensor:
        """``(B, L)`` bool, state-aligned: position t is an action when token t+1 was generated."""
        span = self.gen_span()
        return torch.cat([span[:, 1:], torch.zeros_like(span[:, :1])], dim=1)

    def generations(self) -> list[list[int]]:
        """Generated token ids per row (EOS included when emitted)."""
        rows = self.tokens.tolist()
        return [r[p:p + g] for r, p, g in zip(rows, self.prompt_lens.tolist(), self.gen_lens.tolist())]


def _uses_te_attention(policy) -> bool:
    layers = policy.gpt.decoder.layers
    return len(layers) > 0 and "TE" in type(layers[0].self_attention.core_attention).__name__


@torch.no_grad()
def generate(
    policy,
    prompts: torch.Tensor,
    prompt_lens: torch.Tensor,
    *,
    max_new_tokens: int,
    eos_id: int,
    pad_id: int,
    greedy: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | RowNoise | None = None,
    layout: str = "auto",
    compact: bool = True,
    prefill_call_cost: int | None = None,
    decode: str = "eager",
    lean_decode: bool | None = None,
) -> RolloutBatch:
    """Generate up to ``max_new_tokens`` per row, stopping a row at EOS.

    Args:
        policy: a ``PolicyModel`` (unwrapped from DDP), on the device of ``prompts``.
        prompts: ``(B, P)`` int64, left-padded.
        prompt_lens: ``(B,)`` int64 real prompt lengths (>= 1).
        max_new_tokens: generation limit per row.
        eos_id, pad_id: special ids.
        greedy: argmax decoding (evaluation).
        temperature, top_k, top_p: sampling parameters, all explicit.
        generator: sampling randomness (same seed on all TP ranks): a ``RowNoise`` (the
            samples depend on each row's global id, not on the batch it is in) or a
            ``torch.Generator`` (one stream for the batch).
        layout: ``auto`` | ``left`` | ``aligned`` (see module docstring).
        compact: drop finished rows from the decode batch and its KV cache (the tokens do not
            change: see :class:`_Selector`); False decodes every row until the last one ends.
        prefill_call_cost: ``left`` layout: the cost of one more prefill forward in padded
            tokens, for :func:`plan_prefill_buckets` (None: :func:`default_prefill_call_cost`).
        decode: ``eager`` (attention over the filled slots); ``static``: the step a CUDA graph
            replays, run eagerly (fixed shapes: attention over every cache slot, masked; rows
            leave the batch only when the live ones are at most half of it); ``cuda_graph``:
            ``static`` captured once per batch size and replayed (CUDA only; on a CPU it falls
            back to ``eager`` with a warning). See :class:`_DecodeStep`.
        lean_decode: decode steps through ``KVCache.lean_trunk`` (plain torch calls on the
            layers' weights, same result, a fraction of the Python per step) instead of
            Megatron's modules; None = whenever the model's structure allows it
            (``kv_cache.lean_decode_unsupported``). The prefill always runs Megatron's modules.

    Returns:
        :class:`RolloutBatch`.
    """
    if prompts.dim() != 2 or prompt_lens.shape != prompts.shape[:1]:
        raise ValueError(f"prompts must be (B, P) with prompt_lens (B,), got {tuple(prompts.shape)} "
                         f"and {tuple(prompt_lens.shape)}")
    if prompts.shape[0] == 0:
        empty = prompts.new_zeros((0, prompts.shape[1]))
        return RolloutBatch(empty, prompt_lens, prompt_lens.clone(), prompt_lens.bool(), empty.float())
    if int(prompt_lens.min()) < 1:
        raise ValueError("every prompt needs at least one token")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if layout == "auto":
        layout = "aligned" if _uses_te_attention(policy) else "left"
    if layout not in ("left", "aligned"):
        raise ValueError(f"layout must be auto, left or aligned, got {layout!r}")
    if decode not in ("eager", "static", "cuda_graph"):
        raise ValueError(f"decode must be eager, static or cuda_graph, got {decode!r}")
    if decode == "cuda_graph" and prompts.device.type != "cuda":
        warnings.warn("generate(decode='cuda_graph') needs CUDA tensors; decoding eagerly", stacklevel=2)
        decode = "eager"
    from carft_mega.models.policy import cpu_shim_suspended

    was_training = policy.training
    policy.eval()
    try:
        # Without the CPU shim's mode (a Python call added to every torch call): the lean decode
        # step and the sampler need none of its rewrites (the trunk suspends it for itself anyway).
        with cpu_shim_suspended():
            run = _generate_left if layout == "left" else _generate_aligned
            if prefill_call_cost is None:
                prefill_call_cost = default_prefill_call_cost(prompts.device)
            gen, gen_logp, gen_lens = run(policy, prompts, prompt_lens, max_new_tokens, eos_id, pad_id,
                                          dict(greedy=greedy, temperature=temperature, top_k=top_k,
                                               top_p=top_p, generator=generator),
                                          dict(compact=compact, prefill_call_cost=prefill_call_cost, decode=decode,
                                               lean=lean_decode))
    finally:
        policy.train(was_training)
    return _to_rollout_batch(prompts, prompt_lens, gen, gen_logp, gen_lens, eos_id, pad_id)


def default_prefill_call_cost(device: torch.device) -> int:
    """What one extra prefill forward costs, in padded prompt tokens (a heuristic, see
    :func:`plan_prefill_buckets`): on a CPU a forward's fixed cost is reading the weights once
    (SmolLM2-135M, fp32, 2 cores: about the compute of 32 tokens); on a GPU it is ~15 kernel
    launches per layer, worth thousands of tokens of compute."""
    return 2048 if device.type == "cuda" else 32


def plan_prefill_buckets(lengths: list[int], call_cost: int) -> list[list[int]]:
    """Group prompts by length so the prefill computes few padding tokens.

    Rows sorted by length are cut into contiguous groups minimising
    ``sum over groups (rows x longest prompt of the group + call_cost)`` (an exact O(B^2)
    dynamic programme). ``call_cost = 0`` gives one group per distinct length; a huge one gives
    a single group (one padded prefill).

    Returns:
        groups of row indices, shortest prompts first, rows within a group in index order.
    """
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    L = [lengths[i] for i in order]
    n = len(L)
    best = [0.0] + [float("inf")] * n
    cut = [0] * (n + 1)
    for j in range(1, n + 1):  # groups covering the j shortest rows; the last group is [i, j)
        longest = L[j - 1]
        for i in range(j):
            c = best[i] + (j - i) * longest + call_cost
            if c < best[j]:
                best[j], cut[j] = c, i
    groups, j = [], n
    while j > 0:
        groups.append(sorted(order[cut[j]:j]))
        j = cut[j]
    return groups[::-1]


def _next_logits(policy, hidden: torch.Tensor) -> torch.Tensor:
    """``[S, B, H]`` trunk output -> ``(B, V)`` fp32 logits of the last position (vocab gathered)."""
    logits = policy.lm_logits(hidden[-1:], gather=True)[0]  # (B, V_pad)
    return logits[:, : policy.vocab_size].float()


class _Selector:
    """``select_next`` on the batch positions ``[0, n)``, with tokens independent of which rows are live.

    * greedy: a row's pick depends on its own logits only; the live rows are selected as they are.
    * a :class:`RowNoise`: each row's uniform is keyed by (seed, its global row id, its
      generation step), whatever else is in the batch, so only the rows at hand are sampled
      (``rows`` = their indices into the noise's ``row_ids``, ``lag`` = how many calls later than
      the first their generation started, for the ``aligned`` layout).
    * a plain ``torch.Generator`` (one stream for the batch; ``torch.multinomial`` takes
      ``B x V`` draws per call, so a row's draw depends on its index in the batch): the live
      rows' logits are scattered back to their original rows of a full ``(B, V)`` buffer
      (finished rows keep stale, finite logits) and the full batch is sampled every step, as if
      nothing had been dropped, at the price of sampling ``B`` rows per step.

    Either way the tokens equal those of the uncompacted loop for the same seed, and are the
    same on every TP rank (which shares it).
    """

    def __init__(self, batch: int, vocab: int, device: torch.device, sample_kw: dict,
                 lag: list[int] | None = None):
        self.kw = dict(sample_kw)
        self.noise = self.kw.pop("generator") if isinstance(sample_kw["generator"], RowNoise) else None
        self.lag = lag if lag is not None and any(lag) else None
        self.full = None
        if not sample_kw["greedy"] and self.noise is None:
            self.full = torch.zeros((batch, vocab), dtype=torch.float32, device=device)

    def __call__(self, logits: torch.Tensor, rows: torch.Tensor,
                 rows_host: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """``logits (n, V)`` of the original rows ``rows (n,)`` (device) = ``rows_host`` -> their
        ``(tokens, logp)``, each ``(n,)``."""
        if self.kw["greedy"]:
            return select_next(logits, **self.kw)
        if self.noise is not None:
            lag = None if self.lag is None else [self.lag[r] for r in rows_host]
            return select_next(logits, **self.kw, generator=self.noise, rows=rows_host, lag=lag)
        self.full.index_copy_(0, rows, logits)
        tok, lp = select_next(self.full, **self.kw)
        return tok[rows], lp[rows]


class _DecodeStep:
    """One decode step of the live rows ``[0, n)``: the fed tokens in, their next-token logits out.

    Modes (``generate(decode=...)``):

    * ``eager``: attention over the filled slots ``[0, slot]`` only.
    * ``static``: the shapes stay fixed while ``n`` does: attention over every cache slot with
      the not-yet-filled ones masked, the slot passed as a device tensor, inputs copied into
      buffers owned by the step. What a CUDA graph replays, runnable (and tested) on a CPU.
    * ``cuda_graph``: ``static`` captured with ``torch.cuda.graph`` the first time a batch size
      is seen (after two warm-up runs on a side stream), then replayed; the graphs share one
      memory pool. Needs a GPU to run (not verified on the CPU-only development machines).

    Args:
        policy, cache: the model and its attached :class:`KVCache`.
        table: ``[max_len, d]`` RoPE angles (:meth:`PolicyModel.rotary_table`).
        window: the sliding-attention window, or None.
        mode: see above.
    """

    def __init__(self, policy, cache: KVCache, table: torch.Tensor, window: int | None, mode: str,
                 lean: bool | None = None):
        self.policy, self.cache, self.table, self.window, self.mode = policy, cache, table, window, mode
        why_not = lean_decode_unsupported(policy)
        if lean and why_not:
            raise ValueError(f"lean_decode=True: this model needs Megatron's modules ({why_not})")
        self.lean = why_not is None if lean is None else lean
        self.slots = torch.arange(cache.max_len, device=table.device)
        self._static_n = -1
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._pool = None

    def should_compact(self, n: int, n_live: int) -> bool:
        """Drop the finished rows now? (Eagerly: as soon as one finishes. With fixed shapes: when
        at most half the batch is live, so a graph is captured at most log2(B) + 1 times.)"""
        return n_live < n if self.mode == "eager" else 2 * n_live <= n

    def __call__(self, tok: torch.Tensor, pos: torch.Tensor, base_valid: torch.Tensor | None,
                 slot: int) -> torch.Tensor:
        """Feed ``tok (n,)`` at cache slot ``slot``, rows at RoPE positions ``pos (n,)``.

        Args:
            base_valid: ``(n, max_len)`` bool, False on slots a row never attends to (its left
                padding); None = every slot of every row is real.

        Returns:
            ``(n, V)`` fp32 logits (with CUDA graphs: a buffer overwritten by the next step).
        """
        if self.mode == "eager":
            valid = None if base_valid is None else base_valid[:, :slot + 1]
            if self.window is not None:
                in_window = self.slots[None, :slot + 1] > slot - self.window
                valid = in_window.expand(tok.shape[0], -1) if valid is None else valid & in_window
            self.cache.decode(slot, slot + 1, valid)
            return self._forward(tok, pos)
        n = tok.shape[0]
        if n != self._static_n:
            dev = tok.device
            self._tok = torch.empty(n, dtype=torch.long, device=dev)
            self._pos = torch.empty(n, dtype=torch.long, device=dev)
            self._valid = torch.ones((n, self.cache.max_len), dtype=torch.bool, device=dev)
            self._slot = torch.zeros(1, dtype=torch.long, device=dev)
            self._static_n = n
        self._tok.copy_(tok)
        self._pos.copy_(pos)
        if base_valid is not None:
            self._valid.copy_(base_valid)
        self._slot.fill_(slot)
        if self.mode == "static":
            return self._static_body()
        graph = self._graphs.get(n)
        if graph is None:
            graph = self._graphs[n] = self._capture()
        graph.replay()
        return self._out

    def _forward(self, tok: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        freqs = self.table[pos]  # (n, d): each row's angle, from the one table
        if self.lean:
            hidden = self.cache.lean_trunk(self.policy, tok, freqs)
        else:
            hidden = self.policy.trunk(tok[:, None], rotary_pos_emb=freqs[None, :, None])
        return _next_logits(self.policy, hidden)

    def _static_body(self) -> torch.Tensor:
        valid = self._valid & (self.slots[None] <= self._slot)
        if self.window is not None:
            valid = valid & (self.slots[None] > self._slot - self.window)
        self.cache.decode(self._slot, self.cache.max_len, valid)
        return self._forward(self._tok, self._pos)

    def _capture(self) -> "torch.cuda.CUDAGraph":
        # Warm-up on a side stream (allocator, cuBLAS workspaces), as torch.cuda.graphs asks; it
        # writes the same cache slot the replay writes, with the same values.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self._static_body()
        torch.cuda.current_stream().wait_stream(side)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            self._out = self._static_body()
        return graph


class _Rows:
    """Host-side view of the batch: which of the ``n`` batch positions are still generating."""

    def __init__(self, n: int, device: torch.device, ids: list[int]):
        self.n = n
        self.ids = list(ids)  # host copy of the original row held at each batch position
        self.alive = [True] * n
        self.alive_t = torch.ones(n, dtype=torch.bool, device=device)  # device copy, batch order

    def finish(self, fin: torch.Tensor, step: _DecodeStep, compact: bool, cache: KVCache, upto: int,
               per_row: list[torch.Tensor]) -> bool:
        """Rows with ``fin (n,)`` True emitted their last token. Returns False when none is left.

        The one host sync of a decode step is here (``fin.tolist()``); the indices sent back are
        pinned, non-blocking copies. With ``compact``, finished
        rows leave the batch when ``step.should_compact`` says so: swap-remove in the cache and in
        every ``per_row`` tensor (first dim = batch position, updated in place); until then they
        stay, marked dead, and their outputs are ignored.
        """
        newly = [i for i, f in enumerate(fin.tolist()) if f]
        if not newly:
            return True
        for i in newly:
            self.alive[i] = False
        n_live = sum(self.alive)
        if n_live == 0:
            return False
        if compact and step.should_compact(self.n, n_live):
            new_n, holes, sources = swap_remove_plan(self.n, [i for i in range(self.n) if not self.alive[i]])
            cache.drop(holes, sources, new_n, upto)
            if holes:
                dev = per_row[0].device
                h, src = index_tensor(holes, dev), index_tensor(sources, dev)
                for t in per_row:
                    t[h] = t[src]
                for i, j in zip(holes, sources):
                    self.ids[i] = self.ids[j]
            del self.ids[new_n:]
            self.n = new_n
            self.alive = [True] * new_n
            self.alive_t[:new_n] = True
        else:
            self.alive_t[index_tensor(newly, self.alive_t.device)] = False
        return True


def _generate_left(policy, prompts, prompt_lens, max_new, eos_id, pad_id, sample_kw, opts):
    from carft_mega.models.policy import build_attention_mask

    B, P = prompts.shape
    device = prompts.device
    window = policy.arch.sliding_window
    max_len = P + max_new - 1  # cache slots: the last generated token is never fed back
    table = policy.rotary_table(max_len)  # (max_len, d): every angle of this generation, once
    slots = torch.arange(max_len, device=device)
    cache = KVCache(policy, B, max_len)
    select = _Selector(B, policy.vocab_size, device, sample_kw)
    step_fn = _DecodeStep(policy, cache, table, window, opts["decode"], opts["lean"])

    # Prefill by length buckets. Batch position p holds row row_ids[p]; every row's prompt ends
    # at slot P - 1, as in one left-padded block.
    lens_host = prompt_lens.tolist()
    groups = plan_prefill_buckets(lens_host, opts["prefill_call_cost"])
    order = [r for g in groups for r in g]
    row_ids = torch.tensor(order, dtype=torch.long, device=device)
    pad = (P - prompt_lens)[row_ids]  # (B,) left padding, batch order
    real = slots[None] >= pad[:, None]  # (B, max_len): slots holding a real token (not padding)
    any_padding = min(lens_host) < P
    logits = torch.empty((B, policy.vocab_size), dtype=torch.float32, device=device)
    with cache.attached():
        start = 0
        for g in groups:
            Pg = max(lens_host[r] for r in g)
            rows = slice(start, start + len(g))
            pos = (slots[None, P - Pg:P] - pad[rows, None]).clamp(min=0)  # positions from 0 per row
            cache.prefill(rows, P - Pg)
            hidden = policy.trunk(prompts[row_ids[rows], P - Pg:],
                                  attention_mask=build_attention_mask(real[rows, P - Pg:P], sliding_window=window),
                                  rotary_pos_emb=policy.rotary_for_positions(pos, Pg, table))
            logits[rows] = _next_logits(policy, hidden)
            start += len(g)

        gen = torch.full((B, max_new), pad_id, dtype=torch.long, device=device)
        gen_logp = torch.zeros((B, max_new), dtype=torch.float32, device=device)
        gen_lens = torch.zeros(B, dtype=torch.long, device=device)
        batch = _Rows(B, device, order)
        for step in range(max_new):
            n = batch.n
            rid = row_ids[:n]
            tok, lp = select(logits[:n], rid, batch.ids)
            live = batch.alive_t[:n]
            gen[rid, step] = torch.where(live, tok, pad_id)
            gen_logp[rid, step] = torch.where(live, lp, 0.0)
            gen_lens[rid] += live.long()
            if step == max_new - 1:
                break
            if not batch.finish((tok == eos_id) & live, step_fn, opts["compact"], cache, P + step,
                                [row_ids, pad, real, tok]):
                break
            n = batch.n
            slot = P + step  # where the token just chosen is cached
            logits[:n] = step_fn(tok[:n], slot - pad[:n], real[:n] if any_padding else None, slot)
    return gen, gen_logp, gen_lens


def _generate_aligned(policy, prompts, prompt_lens, max_new, eos_id, pad_id, sample_kw, opts):
    B, P = prompts.shape
    device = prompts.device
    # Left-align the prompts: row b holds its prompt at [0, len_b).
    pad = P - prompt_lens
    cols = torch.arange(P, device=device)[None]
    src = (cols + pad[:, None]).clamp(max=P - 1)
    aligned = torch.where(cols < prompt_lens[:, None], prompts.gather(1, src), pad_id)  # (B, P)
    total = P + max_new
    buf = torch.full((B, total), pad_id, dtype=torch.long, device=device)
    buf[:, :P] = aligned
    logp_buf = torch.zeros((B, total), dtype=torch.float32, device=device)
    max_len = total - 1  # cache slots
    table = policy.rotary_table(max_len)
    cache = KVCache(policy, B, max_len)
    lens_host = prompt_lens.tolist()
    start = min(lens_host)
    # Row b generates from call len_b - start on: its noise is keyed by its own generation step.
    select = _Selector(B, policy.vocab_size, device, sample_kw, lag=[n - start for n in lens_host])
    step_fn = _DecodeStep(policy, cache, table, policy.arch.sliding_window, opts["decode"], opts["lean"])
    gen_lens = torch.zeros(B, dtype=torch.long, device=device)
    # Per batch position (rows leave by swap-remove).
    row_ids = torch.arange(B, device=device)
    lens = prompt_lens.clone()
    stop_at = prompt_lens + max_new  # exclusive end of each row's generation
    logits = torch.empty((B, policy.vocab_size), dtype=torch.float32, device=device)
    batch = _Rows(B, device, list(range(B)))
    with cache.attached():
        cache.prefill(slice(0, B), 0)
        logits[:] = _next_logits(policy, policy.trunk(buf[:, :start], rotary_pos_emb=table[:start, None, None]))
        pos = start
        while True:
            n = batch.n
            rid = row_ids[:n]
            tok, lp = select(logits[:n], rid, batch.ids)
            in_prompt = pos < lens[:n]
            generating = ~in_prompt & batch.alive_t[:n] & (pos < stop_at[:n])
            fed = torch.where(in_prompt, buf[rid, pos], torch.where(generating, tok, pad_id))
            buf[rid, pos] = fed
            logp_buf[rid, pos] = torch.where(generating, lp, 0.0)
            gen_lens[rid] += generating.long()
            pos += 1
            if pos >= total:
                break
            fin = generating & ((tok == eos_id) | (pos >= stop_at[:n]))
            if not batch.finish(fin, step_fn, opts["compact"], cache, pos - 1, [row_ids, lens, stop_at, fed]):
                break
            n = batch.n
            slot = pos - 1  # every row feeds the token at slot pos - 1 (no padding: positions = slots)
            logits[:n] = step_fn(fed[:n], torch.full((n,), slot, dtype=torch.long, device=device), None, slot)
    # Re-express as (B, max_new) generations (never-written cells hold pad / 0).
    idx = prompt_lens[:, None] + torch.arange(max_new, device=device)[None]
    gen = buf.gather(1, idx)
    gen_logp = logp_buf.gather(1, idx)
    return gen, gen_logp, gen_lens


def _to_rollout_batch(prompts, prompt_lens, gen, gen_logp, gen_lens, eos_id, pad_id) -> RolloutBatch:
    """Left-padded prompts + ``(B, G)`` generations of ``gen_lens`` tokens -> left-aligned rows."""
    B, P = prompts.shape
    G = gen.shape[1]
    device = prompts.device
    lengths = prompt_lens + gen_lens
    L = int(lengths.max())
    cols = torch.arange(L, device=device)[None]  # (1, L)
    pad = (P - prompt_lens)[:, None]
    in_prompt = cols < prompt_lens[:, None]
    in_gen = ~in_prompt & (cols < lengths[:, None])
    p_idx = (cols + pad).clamp(max=P - 1)
    g_idx = (cols - prompt_lens[:, None]).clamp(min=0, max=G - 1)
    tokens = torch.where(in_prompt, prompts.gather(1, p_idx),
                         torch.where(in_gen, gen.gather(1, g_idx), pad_id))
    # State-aligned sampling log-probs: token t+1's log-prob sits at position t.
    s_idx = (cols + 1 - prompt_lens[:, None]).clamp(min=0, max=G - 1)
    action = (cols + 1 >= prompt_lens[:, None]) & (cols + 1 < lengths[:, None])
    sample_logp = torch.where(action, gen_logp.gather(1, s_idx), 0.0)
    last_tok = gen.gather(1, (gen_lens - 1).clamp(min=0)[:, None]).squeeze(1)
    finished = (gen_lens > 0) & (last_tok == eos_id)
    return RolloutBatch(tokens=tokens, prompt_lens=prompt_lens.clone(), gen_lens=gen_lens,
                        finished=finished, sample_logp=sample_logp)
