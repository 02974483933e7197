"""HF <-> Megatron-Core weight conversion (Llama / CodeLlama / Qwen2 / Mistral).

``KEY_MAP`` is the one table of names: Megatron ``GPTModel`` parameter (local spec names, ``{}``
= layer index) -> HF parameter(s) and the tensor-parallel layout. Every reshaping is a named
function whose docstring draws the layout: :func:`merge_qkv_gqa` / :func:`split_qkv_gqa`,
:func:`concat_gate_up` / :func:`split_gate_up`, :func:`pad_vocab_rows` /
:func:`strip_vocab_padding`, :func:`shard_for_tp` / :func:`merge_tp_shards`.

Conversions are done tensor by tensor (a safetensors directory is read lazily), so a rank only
ever holds one full layer tensor plus its own shards.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import warnings
from typing import Callable, Iterable

import torch
import torch.distributed as dist

from carft_mega.models.arch import ArchSpec

# Megatron name -> (HF name(s), TP layout). Layouts:
#   vocab      rows = vocabulary: pad to padded_vocab_size, then split rows over TP
#   column     split dim 0 over TP (ColumnParallelLinear)
#   row        split dim 1 over TP (RowParallelLinear)
#   replicated same tensor on every TP rank (norms)
#   qkv        merge_qkv_gqa(q, k, v), then split dim 0 (whole query groups per rank)
#   fc1        concat_gate_up(gate, up), each half split over TP separately
KEY_MAP: dict[str, tuple[str | tuple[str, ...], str]] = {
    "embedding.word_embeddings.weight": ("model.embed_tokens.weight", "vocab"),
    "decoder.layers.{}.input_layernorm.weight": ("model.layers.{}.input_layernorm.weight", "replicated"),
    "decoder.layers.{}.self_attention.linear_qkv.weight": (
        ("model.layers.{}.self_attn.q_proj.weight", "model.layers.{}.self_attn.k_proj.weight",
         "model.layers.{}.self_attn.v_proj.weight"), "qkv"),
    "decoder.layers.{}.self_attention.linear_qkv.bias": (
        ("model.layers.{}.self_attn.q_proj.bias", "model.layers.{}.self_attn.k_proj.bias",
         "model.layers.{}.self_attn.v_proj.bias"), "qkv"),
    "decoder.layers.{}.self_attention.linear_proj.weight": ("model.layers.{}.self_attn.o_proj.weight", "row"),
    "decoder.layers.{}.pre_mlp_layernorm.weight": ("model.layers.{}.post_attention_layernorm.weight", "replicated"),
    "decoder.layers.{}.mlp.linear_fc1.weight": (
        ("model.layers.{}.mlp.gate_proj.weight", "model.layers.{}.mlp.up_proj.weight"), "fc1"),
    "decoder.layers.{}.mlp.linear_fc2.weight": ("model.layers.{}.mlp.down_proj.weight", "row"),
    "decoder.final_layernorm.weight": ("model.norm.weight", "replicated"),
    "output_layer.weight": ("lm_head.weight", "vocab"),
}

# Transformer Engine fuses the pre-attention / pre-MLP norms into the following linear layer.
TE_RENAMES = {
    ".input_layernorm.weight": ".self_attention.linear_qkv.layer_norm_weight",
    ".pre_mlp_layernorm.weight": ".mlp.linear_fc1.layer_norm_weight",
}

# CoT head parameter -> TRL-style name in v_head.safetensors.
V_HEAD_FILE = "v_head.safetensors"
V_HEAD_KEYS = {
    "proj.weight": "v_head.proj.weight",
    "proj.bias": "v_head.proj.bias",
    "summary.weight": "v_head.summary.weight",
    "summary.bias": "v_head.summary.bias",
}


# --------------------------------------------------------------------------------------------
# Named reshapings


def merge_qkv_gqa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_kv_heads: int,
                  head_dim: int) -> torch.Tensor:
    """HF separate q/k/v -> Megatron's fused ``linear_qkv`` (interleaved per query group).

    With ``nh`` query heads in ``ng`` groups (``r = nh / ng`` heads per group), HF stores::

        q: [q_0 q_1 ... q_{nh-1}]      (nh * hd rows)
        k: [k_0 ... k_{ng-1}]          (ng * hd rows)
        v: [v_0 ... v_{ng-1}]          (ng * hd rows)

    Megatron stores, group after group (each block hd rows)::

        [ q_0 .. q_{r-1}  k_0  v_0 | q_r .. q_{2r-1}  k_1  v_1 | ... | ... k_{ng-1} v_{ng-1} ]

    so a contiguous slice of ``ng / tp`` groups is exactly one TP rank's heads.

    Args:
        q: ``[nh*hd, ...]`` (weight ``[nh*hd, H]`` or bias ``[nh*hd]``).
        k, v: ``[ng*hd, ...]``.
        num_kv_heads: ``ng``.
        head_dim: ``hd``.

    Returns:
        ``[(nh + 2 ng) * hd, ...]``.
    """
    ng, hd = num_kv_heads, head_dim
    rest = q.shape[1:]
    qg = q.reshape(ng, -1, *rest)  # (ng, r*hd, ...)
    kg = k.reshape(ng, hd, *rest)
    vg = v.reshape(ng, hd, *rest)
    return torch.cat([qg, kg, vg], dim=1).reshape(-1, *rest)


def split_qkv_gqa(qkv: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int):
    """Inverse of :func:`merge_qkv_gqa`: Megatron ``linear_qkv`` -> HF ``(q, k, v)``.

    Layout (per group ``g``, ``r = nh / ng`` query heads)::

        [ q_{g r} .. q_{g r + r - 1}  k_g  v_g ]  for g = 0 .. ng-1

    Args:
        qkv: ``[(nh + 2 ng) * hd, ...]``.

    Returns:
        ``q [nh*hd, ...]``, ``k [ng*hd, ...]``, ``v [ng*hd, ...]``.
    """
    ng, hd = num_kv_heads, head_dim
    r = num_heads // ng
    rest = qkv.shape[1:]
    g = qkv.reshape(ng, (r + 2) * hd, *rest)
    q, k, v = torch.split(g, [r * hd, hd, hd], dim=1)
    return q.reshape(-1, *rest), k.reshape(-1, *rest), v.reshape(-1, *rest)


def concat_gate_up(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """HF SwiGLU ``gate_proj``, ``up_proj`` -> Megatron ``linear_fc1`` (TP=1 layout)::

        fc1 = [ gate (F rows) ]      Megatron computes silu(fc1[:F] x) * fc1[F:] x
              [ up   (F rows) ]

    Under TP rank ``r`` holds ``[gate_r; up_r]`` (each half split separately, see
    :func:`shard_for_tp` with layout ``fc1``), which is why the halves are kept apart.

    Args:
        gate, up: ``[F, H]``.

    Returns:
        ``[2F, H]``.
    """
    return torch.cat([gate, up], dim=0)


def split_gate_up(fc1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`concat_gate_up`: ``[2F, H]`` -> ``gate [F, H]``, ``up [F, H]``."""
    gate, up = torch.chunk(fc1, 2, dim=0)
    return gate, up


def pad_vocab_rows(weight: torch.Tensor, padded_vocab_size: int) -> torch.Tensor:
    """Append zero rows so the vocabulary splits evenly over TP::

        [ V real rows      ]        [ V real rows            ]
                              ->    [ padded - V zero rows   ]

    Args:
        weight: ``[V, H]`` embedding or LM head.

    Returns:
        ``[padded_vocab_size, H]``.
    """
    extra = padded_vocab_size - weight.shape[0]
    if extra < 0:
        raise ValueError(f"vocabulary of {weight.shape[0]} rows does not fit padded size {padded_vocab_size}")
    if extra == 0:
        return weight
    return torch.cat([weight, weight.new_zeros(extra, *weight.shape[1:])], dim=0)


def strip_vocab_padding(weight: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Drop Megatron's padding rows: ``[padded, H]`` -> ``[vocab_size, H]``."""
    return weight[:vocab_size]


def shard_for_tp(full: torch.Tensor, layout: str, tp_rank: int, tp_size: int) -> torch.Tensor:
    """This TP rank's slice of a full (TP=1) Megatron tensor.

    ::

        column / vocab / qkv : rows split        [ r0 ; r1 ; ... ]           -> rows of rank r
        row                  : columns split     [ c0 | c1 | ... ]           -> columns of rank r
        fc1                  : [gate; up] -> [gate_r; up_r]  (each half split by rows)
        replicated           : the whole tensor

    (``qkv`` is row-split too: with :func:`merge_qkv_gqa`'s group-interleaved layout a row slice is
    ``ng/tp`` whole query groups.)

    Args:
        full: the TP=1 tensor.
        layout: one of ``vocab, column, row, replicated, qkv, fc1``.
        tp_rank, tp_size: this rank and the TP size.

    Returns:
        A contiguous tensor (a copy for split layouts).
    """
    if tp_size == 1 or layout == "replicated":
        return full
    if layout in ("column", "vocab", "qkv"):
        return torch.chunk(full, tp_size, dim=0)[tp_rank].contiguous()
    if layout == "row":
        return torch.chunk(full, tp_size, dim=1)[tp_rank].contiguous()
    if layout == "fc1":
        gate, up = split_gate_up(full)
        return torch.cat([torch.chunk(gate, tp_size, 0)[tp_rank], torch.chunk(up, tp_size, 0)[tp_rank]], 0)
    raise ValueError(f"unknown TP layout {layout!r}")


def merge_tp_shards(shards: list[torch.Tensor], layout: str) -> torch.Tensor:
    """Inverse of :func:`shard_for_tp`: the TP ranks' slices (in rank order) -> the full tensor.

    ::

        column / vocab / qkv : cat rows              [ s0 ; s1 ; ... ]
        row                  : cat columns           [ s0 | s1 | ... ]
        fc1                  : [gate_0; up_0], [gate_1; up_1] -> [gate_0; gate_1; up_0; up_1]
        replicated           : shard 0 (all equal)
    """
    if len(shards) == 1 or layout == "replicated":
        return shards[0]
    if layout in ("column", "vocab", "qkv"):
        return torch.cat(shards, dim=0)
    if layout == "row":
        return torch.cat(shards, dim=1)
    if layout == "fc1":
        halves = [split_gate_up(s) for s in shards]
        return concat_gate_up(torch.cat([h[0] for h in halves], 0), torch.cat([h[1] for h in halves], 0))
    raise ValueError(f"unknown TP layout {layout!r}")


# --------------------------------------------------------------------------------------------
# Names


def megatron_keys(arch: ArchSpec) -> Iterable[tuple[str, str]]:
    """``(template, concrete Megatron name)`` of every GPT parameter of ``arch`` (local spec names)."""
    for tmpl in KEY_MAP:
        if tmpl.endswith("linear_qkv.bias") and not arch.qkv_bias:
            continue
        if tmpl == "output_layer.weight" and arch.tie_embeddings:
            continue
        if "{}" in tmpl:
            for i in range(arch.num_layers):
                yield tmpl, tmpl.format(i)
        else:
            yield tmpl, tmpl


def _layer_of(name: str) -> str | None:
    parts = name.split(".")
    return parts[2] if name.startswith("decoder.layers.") else None


def _hf_names(tmpl: str, name: str) -> tuple[str, ...]:
    hf = KEY_MAP[tmpl][0]
    layer = _layer_of(name)
    hf = hf if isinstance(hf, tuple) else (hf,)
    return tuple(h.format(layer) if layer is not None else h for h in hf)


def to_te_name(name: str) -> str:
    """Local-spec parameter name -> the Transformer Engine spec's name."""
    for old, new in TE_RENAMES.items():
        if name.endswith(old):
            return name[: -len(old)] + new
    return name


def from_te_name(name: str) -> str:
    """Transformer Engine spec parameter name -> the local-spec name (identity for others)."""
    for old, new in TE_RENAMES.items():
        if name.endswith(new):
            return name[: -len(new)] + old
    return name


# --------------------------------------------------------------------------------------------
# HF sources


WEIGHTS_INDEX = "model.safetensors.index.json"


def weight_files(hf_dir: str) -> list[str]:
    """The safetensors files holding an HF directory's weights.

    With ``model.safetensors.index.json`` only the files its ``weight_map`` lists (a directory may
    hold stale or unrelated ``*.safetensors``); otherwise every ``*.safetensors`` except
    ``v_head.safetensors``.
    """
    index = os.path.join(hf_dir, WEIGHTS_INDEX)
    if os.path.isfile(index):
        with open(index) as f:
            try:
                weight_map = json.load(f)["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{index}: not a safetensors index with a 'weight_map' ({e})") from None
        files = [os.path.join(hf_dir, n) for n in sorted(set(weight_map.values()))]
        missing = [f for f in files if not os.path.isfile(f)]
        if missing:
            raise FileNotFoundError(f"{index} lists missing weight files: {missing[:3]}")
        return files
    files = sorted(glob.glob(os.path.join(hf_dir, "*.safetensors")))
    return [f for f in files if os.path.basename(f) != V_HEAD_FILE]


def resolve_hf_path(path: str | os.PathLike) -> str:
    """``path``, or the ``.gguf`` file inside it when it is a directory without safetensors weights
    that holds exactly one ``.gguf`` file (so such a directory works wherever a GGUF file does)."""
    path = os.fspath(path)
    if os.path.isdir(path) and not weight_files(path):
        ggufs = sorted(glob.glob(os.path.join(path, "*.gguf")))
        if len(ggufs) == 1:
            return ggufs[0]
    return path


class HFSource:
    """Lazy access to the tensors of an HF checkpoint plus its config.

    Build with :meth:`open` from a directory (``*.safetensors``, read tensor by tensor), a GGUF
    file (dequantised by transformers), or :meth:`from_model` from a loaded HF model.
    """

    def __init__(self, config, get: Callable[[str], torch.Tensor], names: set[str], path: str | None,
                 gguf_file: str | None = None, model=None):
        self.config = config
        self._get = get
        self.names = names
        self.path = path
        self.gguf_file = gguf_file
        self.model = model
        """The loaded HF model when the source is one (GGUF files, :meth:`from_model`), else None."""

    def get(self, name: str) -> torch.Tensor:
        if name not in self.names:
            raise KeyError(f"{self.path or '<model>'}: tensor {name!r} not found in the HF checkpoint")
        return self._get(name)

    @classmethod
    def from_model(cls, model, path: str | None = None) -> "HFSource":
        sd = model.state_dict()
        return cls(model.config, sd.__getitem__, set(sd), path, model=model)

    @classmethod
    def open(cls, path: str | os.PathLike) -> "HFSource":
        """Open an HF directory (safetensors), a ``.gguf`` file, or a directory holding exactly one
        ``.gguf`` file and no safetensors weights."""
        path = resolve_hf_path(path)
        if path.endswith(".gguf"):
            return cls._open_gguf(path)
        if not os.path.isdir(path):
            raise FileNotFoundError(f"HF checkpoint {path!r}: not a directory or a .gguf file")
        files = weight_files(path)
        if not files:
            raise FileNotFoundError(f"{path}: no *.safetensors weights (and not exactly one .gguf file)")
        from safetensors import safe_open
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(path)

        handles, where = [], {}
        for f in files:
            h = safe_open(f, framework="pt", device="cpu")
            handles.append(h)
            for k in h.keys():
                where[k] = h
        return cls(config, lambda name: where[name].get_tensor(name), set(where), path)

    @classmethod
    def _open_gguf(cls, path: str) -> "HFSource":
        model = load_hf_model(path, dtype=torch.float32)
        src = cls.from_model(model, path)
        src.gguf_file = path
        return src


def load_hf_model(path: str | os.PathLike, dtype: torch.dtype = torch.float32):
    """``AutoModelForCausalLM`` from an HF directory or a GGUF file (eager attention).

    A GGUF model comes back flagged as quantised (``save_pretrained`` refuses it); its weights
    are plain dequantised tensors, which is all the converter needs.
    """
    from transformers import AutoModelForCausalLM

    path = resolve_hf_path(path)
    kw = dict(dtype=dtype, attn_implementation="eager")
    if path.endswith(".gguf"):
        return AutoModelForCausalLM.from_pretrained(os.path.dirname(path) or ".", gguf_file=os.path.basename(path), **kw)
    return AutoModelForCausalLM.from_pretrained(path, **kw)


def load_tokenizer(src: str | os.PathLike):
    """The tokenizer of an HF/tokenizer directory or a GGUF file, or None when there is none.

    A directory with ``tokenizer.json`` is loaded exactly as that file describes it
    (``PreTrainedTokenizerFast``): transformers 5's ``AutoTokenizer`` would pick the class from
    ``config.json``'s model type and may rebuild the pipeline differently.
    """
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    src = resolve_hf_path(src)
    try:
        if src.endswith(".gguf"):
            return AutoTokenizer.from_pretrained(os.path.dirname(src) or ".", gguf_file=os.path.basename(src))
        if os.path.isfile(os.path.join(src, "tokenizer.json")):
            return PreTrainedTokenizerFast.from_pretrained(src)
        if any(os.path.isfile(os.path.join(src, f)) for f in ("tokenizer.model", "vocab.json")):
            return AutoTokenizer.from_pretrained(src)
    except (OSError, ValueError, TypeError):
        return None
    return None


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json")
"""Files that make up an HF tokenizer (copied verbatim between directories)."""


def save_tokenizer(src: str | os.PathLike, out_dir: str | os.PathLike) -> str | None:
    """Put the tokenizer of an HF directory or GGUF file into ``out_dir`` (None if it has none).

    A directory's tokenizer files are copied verbatim (loading and re-saving could change them,
    e.g. transformers picks the tokenizer class from ``config.json``); a GGUF's embedded
    tokenizer is loaded through transformers and saved.
    """
    src = resolve_hf_path(src)
    if not src.endswith(".gguf"):
        files = [f for f in TOKENIZER_FILES if os.path.isfile(os.path.join(src, f))]
        if not any(f in files for f in ("tokenizer.json", "tokenizer.model", "vocab.json")):
            return None
        os.makedirs(out_dir, exist_ok=True)
        for f in files:
            shutil.copy2(os.path.join(src, f), os.path.join(out_dir, f))
        return os.fspath(out_dir)
    tok = load_tokenizer(src)
    if tok is None:
        return None
    os.makedirs(out_dir, exist_ok=True)
    tok.save_pretrained(out_dir)
    return os.fspath(out_dir)


# --------------------------------------------------------------------------------------------
# HF -> Megatron


def hf_to_megatron_tensor(src: HFSource, tmpl: str, name: str, arch: ArchSpec, padded_vocab_size: int,
                          tp_rank: int = 0, tp_size: int = 1) -> torch.Tensor:
    """One Megatron parameter (this TP rank's shard) from the HF tensors it is made of."""
    layout = KEY_MAP[tmpl][1]
    hf = _hf_names(tmpl, name)
    if layout == "qkv":
        full = merge_qkv_gqa(*(src.get(n) for n in hf), arch.num_kv_heads, arch.head_dim)
    elif layout == "fc1":
        full = concat_gate_up(*(src.get(n) for n in hf))
    elif layout == "vocab":
        w = src.get(hf[0])
        if w.shape[0] != arch.vocab_size:
            raise ValueError(f"{src.path}: {hf[0]} has {w.shape[0]} rows, config vocab_size is {arch.vocab_size}")
        full = pad_vocab_rows(w, padded_vocab_size)
    else:
        full = src.get(hf[0])
    return shard_for_tp(full, layout, tp_rank, tp_size)


@torch.no_grad()
def load_hf_into_gpt(gpt, src: HFSource, arch: ArchSpec, tp_rank: int, tp_size: int) -> None:
    """Copy HF weights into a Megatron ``GPTModel`` (this rank's TP shards).

    Every parameter of the model must be covered; shapes are checked.
    """
    params = dict(gpt.named_parameters())
    te = gpt.config.transformer_impl == "transformer_engine"
    done = set()
    for tmpl, name in megatron_keys(arch):
        target = to_te_name(name) if te else name
        if target not in params:
            raise KeyError(f"Megatron model has no parameter {target!r} (from KEY_MAP {tmpl!r})")
        shard = hf_to_megatron_tensor(src, tmpl, name, arch, gpt.vocab_size, tp_rank, tp_size)
        p = params[target]
        if tuple(p.shape) != tuple(shard.shape):
            raise ValueError(f"{src.path or '<model>'}: {name} shard has shape {tuple(shard.shape)}, "
                             f"the Megatron parameter {tuple(p.shape)}")
        p.copy_(shard.to(p.dtype))
        done.add(target)
    missing = sorted(set(params) - done)
    if missing:
        raise KeyError(f"Megatron parameters not covered by the conversion: {missing[:5]}")


# --------------------------------------------------------------------------------------------
# Megatron -> HF


@torch.no_grad()
def gather_gpt_state_dict(gpt, arch: ArchSpec, tp_group: dist.ProcessGroup | None,
                          tensor_fn: Callable[[torch.nn.Parameter], torch.Tensor] | None = None
                          ) -> dict[str, torch.Tensor]:
    """The full (TP=1 layout) Megatron GPT weights, local-spec names; a collective over ``tp_group``.

    Args:
        gpt: the Megatron model (this rank's shards).
        arch: its architecture.
        tp_group: the TP group it is split over.
        tensor_fn: what to gather per parameter (default the parameter itself; e.g.
            ``lambda p: p.main_grad`` gathers Megatron DDP's gradients in the same layout).

    Returns:
        The same dict on every TP rank (CPU tensors).
    """
    params = dict(gpt.named_parameters())
    te = gpt.config.transformer_impl == "transformer_engine"
    tp_size = dist.get_world_size(tp_group) if tp_group is not None else 1
    out = {}
    for tmpl, name in megatron_keys(arch):
        p = params[to_te_name(name) if te else name]
        local = (tensor_fn(p) if tensor_fn is not None else p).detach()
        layout = KEY_MAP[tmpl][1]
        if tp_size > 1 and layout != "replicated":
            shards = [torch.empty_like(local) for _ in range(tp_size)]
            dist.all_gather(shards, local.contiguous(), group=tp_group)
        else:
            shards = [local]
        out[name] = merge_tp_shards([s.cpu() for s in shards], layout)
    return out


def megatron_to_hf_state_dict(full: dict[str, torch.Tensor], arch: ArchSpec) -> dict[str, torch.Tensor]:
    """Full Megatron GPT weights (local-spec names) -> HF names (vocabulary padding stripped).

    Tied models get no ``lm_head.weight`` (HF ties it to ``model.embed_tokens.weight``).
    """
    out = {}
    for tmpl, name in megatron_keys(arch):
        layout = KEY_MAP[tmpl][1]
        hf = _hf_names(tmpl, name)
        t = full[name]
        if layout == "qkv":
            for n, part in zip(hf, split_qkv_gqa(t, arch.num_heads, arch.num_kv_heads, arch.head_dim)):
                out[n] = part.contiguous()
        elif layout == "fc1":
            for n, part in zip(hf, split_gate_up(t)):
                out[n] = part.contiguous()
        elif layout == "vocab":
            out[hf[0]] = strip_vocab_padding(t, arch.vocab_size).contiguous()
        else:
            out[hf[0]] = t.contiguous()
    return out


def v_head_to_hf(head_sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CoT head state dict (``proj.weight`` ...) -> TRL-style ``v_head.*`` names."""
    return {V_HEAD_KEYS[k]: v.detach().cpu().contiguous() for k, v in head_sd.items()}


def v_head_from_hf(tensors: dict[str, torch.Tensor], path: str = V_HEAD_FILE) -> dict[str, torch.Tensor]:
    """TRL-style ``v_head.*`` tensors -> CoT head state dict; every key must be present."""
    inv = {v: k for k, v in V_HEAD_KEYS.items()}
    missing = sorted(set(inv) - set(tensors))
    if missing:
        raise KeyError(f"{path}: missing {missing}")
    return {inv[k]: tensors[k] for k in inv}


def save_hf_checkpoint(out_dir: str | os.PathLike, hf_sd: dict[str, torch.Tensor], arch: ArchSpec, *,
                       dtype: torch.dtype | None = None, v_head: dict[str, torch.Tensor] | None = None,
                       tokenizer_dir: str | None = None, config_extra: dict | None = None) -> None:
    """Write an HF directory: ``config.json``, ``model.safetensors``, tokenizer files, ``v_head.safetensors``.

    Args:
        out_dir: created if missing.
        hf_sd: HF-named weights (from :func:`megatron_to_hf_state_dict`).
        arch: architecture (for ``config.json``).
        dtype: cast the weights (default: keep).
        v_head: CoT head state dict (``proj.weight`` ...), written as ``v_head.safetensors``.
        tokenizer_dir: directory whose tokenizer files are copied next to the weights.
        config_extra: extra config fields (``bos_token_id`` ...).
    """
    from safetensors.torch import save_file

    os.makedirs(out_dir, exist_ok=True)
    cfg = arch.to_hf_config(**(config_extra or {}))
    arch_cls = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM"}
    cfg.architectures = [arch_cls[arch.family]]
    tensors = {k: (v.to(dtype) if dtype is not None else v).contiguous() for k, v in hf_sd.items()}
    cfg.dtype = str(next(iter(tensors.values())).dtype).replace("torch.", "")
    cfg.save_pretrained(out_dir)
    save_file(tensors, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    if v_head is not None:
        save_file(v_head_to_hf(v_head), os.path.join(out_dir, V_HEAD_FILE), metadata={"format": "pt"})
    if tokenizer_dir:
        for f in TOKENIZER_FILES:
            if os.path.isfile(os.path.join(tokenizer_dir, f)):
                shutil.copy2(os.path.join(tokenizer_dir, f), os.path.join(out_dir, f))


def v_head_path(hf_path: str | os.PathLike) -> str:
    """Where the CoT head of an HF directory or GGUF file lives: ``v_head.safetensors`` beside the weights."""
    hf_path = os.fspath(hf_path)
    folder = hf_path if os.path.isdir(hf_path) else os.path.dirname(hf_path)
    return os.path.join(folder, V_HEAD_FILE)


def read_v_head(hf_path: str | os.PathLike) -> dict[str, torch.Tensor] | None:
    """The CoT head saved with an HF checkpoint, or None.

    Read from ``v_head.safetensors`` beside the weights (in the directory, or next to a GGUF file);
    failing that, from ``v_head.*`` tensors inside the weight files when all four are there. A
    partial set there (TRL's value head has ``v_head.summary.*`` only) is ignored with a warning.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = v_head_path(hf_path)
    if os.path.exists(path):
        return v_head_from_hf(load_file(path), path)
    if not os.path.isdir(hf_path):
        return None
    found = {}
    for f in weight_files(os.fspath(hf_path)):
        with safe_open(f, framework="pt", device="cpu") as h:
            found.update({k: h.get_tensor(k) for k in h.keys() if k.startswith("v_head.")})
    if not found:
        return None
    if set(found) == set(V_HEAD_KEYS.values()):
        return v_head_from_hf(found, os.fspath(hf_path))
    warnings.warn(f"{hf_path}: the weight files hold {sorted(found)} but not the full CoT head "
                  f"{sorted(V_HEAD_KEYS.values())}; ignored (the CoT head is initialised from the seed)",
                  stacklevel=2)
    return None


TOKEN_ID_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id")


def hf_token_ids(config) -> dict:
    """bos/eos/pad token ids of an HF config (for round-tripping ``config.json``)."""
    return {k: getattr(config, k) for k in TOKEN_ID_FIELDS if getattr(config, k, None) is not None}


def export_token_ids(token_ids: dict | None, tokenizer_dir: str | None = None) -> dict:
    """bos/eos/pad ids for an exported ``config.json``: every field of :data:`TOKEN_ID_FIELDS`.

    ``token_ids`` (the source model's, carried in ``carft_arch.json``) win; without them the ids
    of the tokenizer in ``tokenizer_dir``; a field neither gives is None. It must be None
    explicitly: the transformers config classes would otherwise fill in their defaults (Llama's
    bos 1 / eos 2, wrong for Llama-3 and SmolLM2).
    """
    if token_ids:
        return {k: token_ids.get(k) for k in TOKEN_ID_FIELDS}
    tok = load_tokenizer(tokenizer_dir) if tokenizer_dir else None
    return {k: getattr(tok, k, None) if tok is not None else None for k in TOKEN_ID_FIELDS}


__all__ = [
    "KEY_MAP", "TE_RENAMES", "V_HEAD_FILE", "V_HEAD_KEYS", "HFSource", "merge_qkv_gqa", "split_qkv_gqa",
    "concat_gate_up", "split_gate_up", "pad_vocab_rows", "strip_vocab_padding", "shard_for_tp",
    "merge_tp_shards", "megatron_keys", "to_te_name", "from_te_name", "hf_to_megatron_tensor",
    "load_hf_into_gpt", "gather_gpt_state_dict", "megatron_to_hf_state_dict", "save_hf_checkpoint",
    "read_v_head", "v_head_path", "v_head_to_hf", "v_head_from_hf", "load_hf_model", "load_tokenizer", "save_tokenizer",
    "hf_token_ids", "export_token_ids", "TOKEN_ID_FIELDS", "weight_files", "resolve_hf_path", "WEIGHTS_INDEX",
]
