"""Checks a run makes before any expensive work, and the one-line errors they raise.

An error a user can fix (a missing model or data file, a truncated download, an out_dir that cannot
be written, a disk too small for a checkpoint) is a :class:`RunError`: one line naming the config
field or the file. ``python -m carft_mega.train`` prints it once (rank 0) and exits 2;
``python -m carft_mega.launch`` runs :func:`preflight` in the launching process, before torchrun
starts any worker, so such a run fails in a second without a torchrun ``ChildFailedError`` report.

Nothing here imports megatron or transformers: the checks read file headers (safetensors, GGUF,
``carft_arch.json``) and ask the filesystem.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
from dataclasses import dataclass

from carft_mega.config import TrainerConfig


class RunError(Exception):
    """An error the user can fix, as one line that names the config field or the file."""


@dataclass
class ModelFacts:
    """What the preflight learns about the model from its files.

    Attributes:
        params: parameter count of the GPT (the CoT head is negligible), or None when unknown.
        kv_heads: key/value heads (TP must divide them), or None when unknown.
        what: a short description for messages.
    """

    params: int | None
    kv_heads: int | None
    what: str


# --------------------------------------------------------------------------------------------
# Probes (module-level, so tests can monkeypatch them)


def free_bytes(path: str) -> int:
    """Free bytes on the filesystem holding ``path`` (which exists)."""
    return shutil.disk_usage(path).free


def existing_ancestor(path: str) -> str:
    """``path`` or its nearest existing ancestor."""
    p = os.path.abspath(path)
    while not os.path.exists(p):
        parent = os.path.dirname(p)
        if parent == p:
            break
        p = parent
    return p


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


# --------------------------------------------------------------------------------------------
# Model files


def _safetensors_params(path: str) -> int:
    """Elements of every tensor in a safetensors file, from its JSON header (no tensor is read)."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise RunError(f"model file {path} is truncated or not a safetensors file ({os.path.getsize(path)} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > 100_000_000 or n + 8 > os.path.getsize(path):
            raise RunError(f"model file {path} is truncated or not a safetensors file (header of {n} bytes)")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise RunError(f"model file {path} is not a valid safetensors file ({e})") from None
    total, end = 0, 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        count = 1
        for d in info["shape"]:
            count *= d
        total += count
        end = max(end, info["data_offsets"][1])
    if 8 + n + end > os.path.getsize(path):
        raise RunError(f"model file {path} is truncated: {os.path.getsize(path)} bytes, its tensors need "
                       f"{8 + n + end} (download it again)")
    return total


def check_gguf(path: str) -> ModelFacts:
    """A GGUF file's parameter count and KV heads; a truncated or corrupt file is a RunError naming it."""
    size = os.path.getsize(path)
    try:
        from gguf import GGUFReader

        reader = GGUFReader(path)
    except ImportError:
        return ModelFacts(None, None, f"GGUF file {path}")
    except Exception as e:  # numpy's reshape of a short memmap, struct errors, bad magic
        raise RunError(f"model file {path} is truncated or not a valid GGUF file ({size} bytes: "
                       f"{type(e).__name__}: {e}); download it again") from None
    end = max((int(t.data_offset) + int(t.n_bytes) for t in reader.tensors), default=0)
    if end > size:
        raise RunError(f"model file {path} is truncated: {size} bytes, its tensors need {end} (download it again)")
    params = sum(int(t.n_elements) for t in reader.tensors)
    arch = _gguf_field(reader, "general.architecture")
    kv = _gguf_field(reader, f"{arch}.attention.head_count_kv") if arch else None
    return ModelFacts(params, int(kv) if kv is not None else None, f"GGUF file {path}")


def _gguf_field(reader, key: str):
    field = reader.fields.get(key)
    if field is None or not field.data:
        return None
    from gguf import GGUFValueType

    value = field.parts[field.data[0]]
    if field.types and field.types[0] == GGUFValueType.STRING:
        return bytes(value).decode("utf-8", "replace")
    return value[0].item()


def _gguf_in(path: str) -> str | None:
    """The one ``.gguf`` file in a directory without safetensors weights (as ``convert.resolve_hf_path``)."""
    files = os.listdir(path)
    if any(f.endswith(".safetensors") for f in files):
        return None
    ggufs = sorted(f for f in files if f.endswith(".gguf"))
    return os.path.join(path, ggufs[0]) if len(ggufs) == 1 else None


def check_model(cfg: TrainerConfig) -> ModelFacts:
    """The model source exists, is complete, and fits ``parallel.tp``; returns what it learned."""
    m = cfg.model
    if m.tokenizer and m.tokenizer != "char" and not os.path.exists(m.tokenizer):
        raise RunError(f"config field 'model.tokenizer' = {m.tokenizer!r}: no such file or directory")
    if m.source == "tiny":
        from carft_mega.models.arch import arch_from_tiny

        return ModelFacts(param_count(arch_from_tiny(m.tiny, 99)), m.tiny.num_kv_heads, "the tiny model")
    path = m.path
    if not os.path.exists(path):
        raise RunError(f"config field 'model.path' = {path!r} (MODEL= in the example scripts): no such file or "
                       f"directory")
    facts = model_facts(path, m.source, tokenizer_set=bool(m.tokenizer))
    check_tp(facts, cfg.parallel.tp, "config field 'parallel.tp' = {tp} (TP= in the example scripts)")
    return facts


def model_facts(path: str, source: str, tokenizer_set: bool = True) -> ModelFacts:
    """Size and KV heads of an existing HF directory / GGUF file (``hf``) or checkpoint (``mcore``)."""
    if not os.path.exists(path):
        raise RunError(f"{path}: no such file or directory")
    if source == "mcore":
        return _check_mcore(path, tokenizer_set=tokenizer_set)
    if os.path.isfile(path):
        if not path.endswith(".gguf"):
            raise RunError(f"config field 'model.path' = {path!r}: a file, but not a .gguf file (model.source=hf "
                           f"takes an HF directory or a GGUF file)")
        return check_gguf(path)
    gguf = _gguf_in(path)
    return check_gguf(gguf) if gguf is not None else _check_hf_dir(path)


def check_tp(facts: ModelFacts, tp: int, name: str) -> None:
    """TP splits whole KV heads (Megatron's fused QKV is cut by query groups): ``tp`` must divide them.

    Args:
        name: how the setting is called in the message, with ``{tp}`` (a config field, or a tool's ``--tp``).
    """
    if facts.kv_heads is not None and facts.kv_heads % tp:
        divisors = [d for d in range(1, facts.kv_heads + 1) if facts.kv_heads % d == 0]
        raise RunError(f"{name.format(tp=tp)}: must divide the {facts.kv_heads} KV heads of {facts.what}; "
                       f"use one of {divisors}")


def _check_hf_dir(path: str) -> ModelFacts:
    config = os.path.join(path, "config.json")
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            files = sorted({os.path.join(path, v) for v in json.load(f).get("weight_map", {}).values()})
        missing = [f for f in files if not os.path.isfile(f)]
        if missing:
            raise RunError(f"model directory {path}: {index} lists missing weight files, e.g. {missing[0]}")
    else:
        files = sorted(os.path.join(path, f) for f in os.listdir(path)
                       if f.endswith(".safetensors") and f != "v_head.safetensors")
    if not os.path.isfile(config) or not files:
        raise RunError(f"config field 'model.path' = {path!r}: not an HF model directory (needs config.json and "
                       f"*.safetensors, or exactly one .gguf file)")
    params = sum(_safetensors_params(f) for f in files)
    try:
        with open(config) as f:
            hf = json.load(f)
    except json.JSONDecodeError as e:
        raise RunError(f"model file {config} is not valid JSON ({e})") from None
    kv = hf.get("num_key_value_heads") or hf.get("num_attention_heads")
    return ModelFacts(params, kv, f"the model in {path}")


def _check_mcore(path: str, tokenizer_set: bool) -> ModelFacts:
    from carft_mega.models.arch import read_arch_json

    arch_file = os.path.join(path, "carft_arch.json")
    if not os.path.isfile(arch_file):
        raise RunError(f"config field 'model.path' = {path!r}: not a carft_mega Megatron checkpoint (no "
                       f"carft_arch.json; tools/convert_hf_to_megatron.py writes one, or use model.source=hf)")
    try:
        info = read_arch_json(path)
    except (ValueError, FileNotFoundError) as e:
        raise RunError(str(e)) from None
    if not os.path.isfile(os.path.join(path, "metadata.json")):
        raise RunError(f"config field 'model.path' = {path!r}: checkpoint without weights (no metadata.json "
                       f"from dist_checkpointing)")
    tok = info.get("tokenizer")
    if not tokenizer_set:
        if not tok:
            raise RunError(f"config field 'model.tokenizer' is unset and the checkpoint {path} carries no tokenizer "
                           f"(written before checkpoints saved one): set model.tokenizer to the tokenizer of the "
                           f"model it was trained from")
        if tok != "char" and not os.path.isdir(tok if os.path.isabs(tok) else os.path.join(path, tok)):
            raise RunError(f"checkpoint {path}: its tokenizer directory {tok!r} is missing; set model.tokenizer")
    arch = info["arch"]
    return ModelFacts(param_count(arch), arch.num_kv_heads, f"the checkpoint {path}")


def param_count(arch) -> int:
    """Parameters of the GPT of an ``ArchSpec`` (embedding, layers, final norm, untied LM head)."""
    H, nh, ng, hd, F = arch.hidden_size, arch.num_heads, arch.num_kv_heads, arch.head_dim, arch.ffn_hidden_size
    attn = H * nh * hd + 2 * H * ng * hd + nh * hd * H + ((nh + 2 * ng) * hd if arch.qkv_bias else 0)
    layer = attn + 3 * H * F + 2 * H
    return arch.vocab_size * H * (1 if arch.tie_embeddings else 2) + arch.num_layers * layer + H


def checkpoint_bytes(params: int, dtype: str) -> int:
    """Expected size of one trainer checkpoint: the weights plus Adam's two moments (fp32), plus the
    fp32 main copy of bf16 weights."""
    if dtype == "auto":
        import torch

        dtype = "bf16" if torch.cuda.is_available() else "fp32"
    per = {"fp32": 4 + 8, "bf16": 2 + 4 + 8, "fp16": 2 + 4 + 8}[dtype]
    return params * per


# --------------------------------------------------------------------------------------------
# Data, out_dir, disk, optional packages


def check_data(cfg: TrainerConfig) -> None:
    """Both splits can be found (without reading them); a missing file is a RunError naming the field."""
    from carft_mega.data.loaders import locate_from_config

    for split in ("train", "test"):
        locate_from_config(cfg.data, split)


def check_out_dir(cfg: TrainerConfig) -> str:
    """``out_dir`` is (or can be made) a writable directory; returns the nearest existing path."""
    out = cfg.out_dir
    base = existing_ancestor(out)
    if not os.path.isdir(base):
        raise RunError(f"config field 'out_dir' = {out!r} (OUT= in the example scripts): {base} is a file, not a "
                       f"directory")
    try:  # a real write: catches read-only mounts and permissions (os.access is True for root)
        fd, probe = tempfile.mkstemp(prefix=".carft_write_probe_", dir=base)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise RunError(f"config field 'out_dir' = {out!r} (OUT= in the example scripts): cannot write in {base} "
                       f"({e.strerror})") from None
    return base


def check_free_space(cfg: TrainerConfig, facts: ModelFacts, where: str) -> None:
    """The filesystem of ``out_dir`` holds one more checkpoint (and an HF export when asked for)."""
    if facts.params is None:
        return
    need = checkpoint_bytes(facts.params, cfg.model.dtype)
    if cfg.checkpoint.export_hf:
        need += facts.params * 4
    free = free_bytes(where)
    if free < 1.1 * need:
        raise RunError(f"not enough free space for a checkpoint in out_dir {cfg.out_dir!r}: {human_bytes(free)} free, "
                       f"a checkpoint of {facts.what} needs about {human_bytes(need)} ({facts.params / 1e6:.1f}M "
                       f"parameters with their Adam state); free some space or set out_dir elsewhere")


def check_packages(cfg: TrainerConfig) -> None:
    """Optional packages a config asks for are importable."""
    if cfg.logging.wandb:
        import importlib.util

        if importlib.util.find_spec("wandb") is None:
            raise RunError("config field 'logging.wandb' = True: the 'wandb' package is not installed "
                           "(pip install wandb), or set logging.wandb=false")


def preflight(cfg: TrainerConfig) -> ModelFacts:
    """Every check above, cheapest first. Raises :class:`RunError`."""
    check_packages(cfg)
    where = check_out_dir(cfg)
    facts = check_model(cfg)
    check_data(cfg)
    check_free_space(cfg, facts, where)
    return facts


__all__ = ["RunError", "ModelFacts", "preflight", "check_model", "model_facts", "check_tp", "check_gguf", "check_data", "check_out_dir",
           "check_free_space", "check_packages", "free_bytes", "param_count", "checkpoint_bytes", "human_bytes"]
