"""Dataset loaders: GSM8K official JSONL, ReFT JSON lists (nl / python_sdp / test sets), the
Hugging Face hub (openai/gsm8k), and the embedded synthetic task, all normalised to ``Record``.

File layout under a data directory (the same as ../shared/data)::

    gsm8k/train.jsonl            official GSM8K (question, answer ending "#### N")
    gsm8k/test.jsonl             official GSM8K test
    gsm8k/gsm8k_test_set.json    ReFT's GSM8K test set (item_id, question, answer_value)
    gsm8k/gsm8k_nl.json          ReFT's GPT-3.5 nl CoTs, if you have them (not public)
    gsm8k/gsm8k_python_sdp.json  ReFT's python CoTs, if you have them (not public)
    svamp/svamp_nl.json, svamp/svamp_python_sdp.json, svamp/svamp_test_set.json   (ReFT)
"""

from __future__ import annotations

import json
import logging
import os
import re
from typing import Any

from .records import STYLES, DataError, Record, parse_answer_value
from .synthetic import synthetic_split

logger = logging.getLogger(__name__)

DATASETS = ("gsm8k", "svamp", "synthetic")
SPLITS = ("train", "test")
SYNTHETIC_DEFAULT_SIZE = {"train": 2000, "test": 200}
HF_GSM8K = ("openai/gsm8k", "main")

# Candidate files per (dataset, split, style), in the order they are tried in each data directory.
CANDIDATES: dict[tuple[str, str, str], tuple[str, ...]] = {
    ("gsm8k", "train", "nl"): ("gsm8k/train.jsonl", "gsm8k/gsm8k_nl.json"),
    ("gsm8k", "train", "python"): ("gsm8k/gsm8k_python_sdp.json",),
    ("gsm8k", "test", "nl"): ("gsm8k/test.jsonl", "gsm8k/gsm8k_test_set.json"),
    ("gsm8k", "test", "python"): ("gsm8k/test.jsonl", "gsm8k/gsm8k_test_set.json"),
    ("svamp", "train", "nl"): ("svamp/svamp_nl.json",),
    ("svamp", "train", "python"): ("svamp/svamp_python_sdp.json",),
    ("svamp", "test", "nl"): ("svamp/svamp_test_set.json",),
    ("svamp", "test", "python"): ("svamp/svamp_test_set.json",),
}

_CALC_ANNOTATION = re.compile(r"<<.*?>>")  # GSM8K calculator annotations, e.g. "<<48/2=24>>"
_MAX_LISTED_BAD_ROWS = 5


class DataNotFoundError(FileNotFoundError):
    """No data file found anywhere; the message lists every place that was tried (``looked``)."""

    def __init__(self, message: str, looked: list[str] | None = None, **where):
        super().__init__(message)
        self.looked = looked or []
        self.where = where


def _field(row: dict, key: str, types: tuple[type, ...], required: bool = True) -> Any:
    if key not in row or row[key] is None:
        if required:
            raise ValueError(f"missing field {key!r}")
        return None
    value = row[key]
    if isinstance(value, bool) or not isinstance(value, types):
        names = " or ".join(t.__name__ for t in types)
        raise ValueError(f"field {key!r} must be {names}, got {type(value).__name__}")
    return value


def row_to_record(row: Any, *, style: str, default_id: str, require_cot: bool) -> Record:
    """Normalise one raw row (ReFT or GSM8K official schema) to a ``Record``.

    ReFT rows have ``answer_value`` (and ``answer_cot`` except in test sets); GSM8K rows have
    ``answer`` = CoT + ``"#### N"``. GSM8K's CoT loses its ``<<...>>`` calculator annotations; in
    python style a GSM8K row has no usable CoT (it is prose), so its cot is None.

    Raises:
        ValueError: a short reason (callers prefix the file and row).
    """
    if not isinstance(row, dict):
        raise ValueError(f"expected a JSON object, got {type(row).__name__}")
    question = _field(row, "question", (str,))
    if not question.strip():
        raise ValueError("field 'question' is empty")
    if "answer_value" in row:
        value, text = parse_answer_value(_field(row, "answer_value", (str, int, float)))
        cot = _field(row, "answer_cot", (str,), required=False)
        item_id = _field(row, "item_id", (str, int), required=False)
        rec_id = default_id if item_id is None else str(item_id)
    elif "answer" in row:
        answer = _field(row, "answer", (str,))
        if "####" not in answer:
            raise ValueError("field 'answer' has no '#### <value>' line")
        cot_raw, _, raw_value = answer.rpartition("####")
        value, text = parse_answer_value(raw_value)
        cot = _CALC_ANNOTATION.sub("", cot_raw).strip()
        if style == "python":
            cot = None  # GSM8K official CoTs are prose, not solution() programs
        rec_id = default_id
    else:
        raise ValueError("missing field 'answer_value' (ReFT format) or 'answer' (GSM8K format)")
    if cot is not None and not cot.strip():
        raise ValueError("the CoT is empty")
    if cot is None and require_cot:
        raise ValueError("missing field 'answer_cot' (a training row needs a CoT"
                         + (" program" if style == "python" else "") + ")")
    if style == "python" and cot is not None and "def solution(" not in cot:
        raise ValueError("python-style answer_cot has no 'def solution(' program")
    return Record(id=rec_id, question=question, cot=cot, answer=value, answer_text=text, style=style)


def read_file_records(path: str, style: str = "nl", *, require_cot: bool = False, id_prefix: str = "row_",
                      skip_bad_rows: bool = False) -> tuple[list[Record], list[tuple[str, str]]]:
    """Parse one data file (format detected from its content: a JSON list, or JSON Lines).

    Args:
        path: a ``.json`` list or ``.jsonl`` file.
        style: ``"nl"`` or ``"python"``.
        require_cot: rows without a CoT are malformed (training files).
        id_prefix: ids of rows without ``item_id`` are ``f"{id_prefix}{index}"``.
        skip_bad_rows: skip malformed rows instead of raising.

    Returns:
        (records, bad_rows) where bad_rows lists ``(where, reason)`` for each skipped row,
        ``where`` being ``"line N"`` (JSONL, 1-based) or ``"index N"`` (JSON list, 0-based).

    Raises:
        DataError: a malformed file, or a malformed row when ``skip_bad_rows`` is False; the
            message names the file and the row.
    """
    try:
        with open(path, "rb") as f:
            raw = f.read()
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason})") from None
    if not text.strip():
        raise DataError(f"{path}: the file is empty")
    records: list[Record] = []
    bad: list[tuple[str, str]] = []

    def add(row: Any, where: str, index: int) -> None:
        try:
            records.append(row_to_record(row, style=style, default_id=f"{id_prefix}{index}",
                                         require_cot=require_cot))
        except ValueError as e:
            item = row.get("item_id") if isinstance(row, dict) else None
            label = f"{where}" + (f" (item_id {item!r})" if isinstance(item, (str, int)) else "")
            if not skip_bad_rows:
                raise DataError(f"{path}: {label}: {e}") from None
            bad.append((where, str(e)))

    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}): {e.msg}") from None
        for i, row in enumerate(rows):
            add(row, f"index {i}", i)
    else:
        if sum(1 for line in text.splitlines() if line.strip()) > 1:
            try:  # a pretty-printed JSON object is neither a list nor JSON Lines
                whole = json.loads(text)
            except json.JSONDecodeError:
                whole = None
            if isinstance(whole, dict):
                raise DataError(f"{path}: expected a JSON list of records or JSON Lines, got one JSON object")
        index = 0
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                if not skip_bad_rows:
                    raise DataError(f"{path}: line {lineno}: invalid JSON ({e.msg}, column {e.colno})") from None
                bad.append((f"line {lineno}", f"invalid JSON ({e.msg})"))
                index += 1
                continue
            add(row, f"line {lineno}", index)
            index += 1
    return records, bad


def load_file(path: str, style: str = "nl", *, require_cot: bool = False, id_prefix: str = "row_",
              skip_bad_rows: bool = False, limit: int | None = None) -> list[Record]:
    """``read_file_records`` plus one logged summary line when rows were skipped, and ``limit``."""
    records, bad = read_file_records(path, style, require_cot=require_cot, id_prefix=id_prefix,
                                     skip_bad_rows=skip_bad_rows)
    if bad:
        listed = ", ".join(where for where, _ in bad[:_MAX_LISTED_BAD_ROWS])
        more = ", ..." if len(bad) > _MAX_LISTED_BAD_ROWS else ""
        logger.warning("%s: skipped %d malformed rows (%s%s); first reason: %s", path, len(bad), listed, more,
                       bad[0][1])
    if not records:
        raise DataError(f"{path}: no usable records" + (f" ({len(bad)} malformed rows skipped)" if bad else ""))
    return records[:limit] if limit is not None else records


def _load_hub(name: str, split: str, style: str, require_cot: bool, limit: int | None) -> list[Record]:
    """openai/gsm8k through ``datasets`` (fails fast when HF_DATASETS_OFFLINE / HF_HUB_OFFLINE is set
    and the dataset is not in the local cache)."""
    import datasets  # heavy import, only on this fallback

    repo, config = HF_GSM8K
    ds = datasets.load_dataset(repo, config, split=split)
    prefix = f"{name}_" if split == "test" else f"{name}_train_"
    out = []
    for i, row in enumerate(ds):
        if limit is not None and len(out) >= limit:
            break
        try:
            out.append(row_to_record(dict(row), style=style, default_id=f"{prefix}{i}", require_cot=require_cot))
        except ValueError as e:
            raise DataError(f"hub {repo}/{config} split {split}: row {i}: {e}") from None
    return out


def load_dataset(name: str, split: str, style: str = "nl", *, path: str | None = None,
                 data_dir: str | None = None, skip_bad_rows: bool = False, limit: int | None = None,
                 seed: int = 0, min_steps: int = 1, max_steps: int = 3, max_value: int = 99,
                 annotation_noise: float = 0.0) -> list[Record]:
    """Load a split as ``Record``s.

    Search order: ``path`` (an explicit file; missing -> error) -> ``data_dir`` -> ``$CARFT_DATA_DIR``
    -> the Hugging Face hub (GSM8K only, ``openai/gsm8k`` config ``main``). When nothing is found
    a ``DataNotFoundError`` lists every place that was tried.

    Args:
        name: ``"gsm8k"``, ``"svamp"`` or ``"synthetic"`` (generated, no files).
        split: ``"train"`` (rows must have a CoT) or ``"test"`` (CoT optional).
        style: ``"nl"`` or ``"python"``. GSM8K has no public python-style train file.
        path: explicit JSON/JSONL file.
        data_dir: directory with the layout of ../shared/data (see module doc).
        skip_bad_rows: skip (count and log) malformed rows instead of raising ``DataError``.
        limit: keep the first ``limit`` records; for ``synthetic`` it is the number generated
            (default 2000 train / 200 test).
        seed, min_steps, max_steps, max_value, annotation_noise: synthetic task only
            (``synthetic.synthetic_split``).
    """
    if name not in DATASETS:
        raise ValueError(f"dataset name must be one of {DATASETS}, got {name!r}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if style not in STYLES:
        raise ValueError(f"style must be one of {STYLES}, got {style!r}")
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    if name == "synthetic":
        if path is not None:
            raise ValueError("the synthetic dataset is generated; it takes no path")
        n = SYNTHETIC_DEFAULT_SIZE[split] if limit is None else limit
        return synthetic_split(split, n, seed=seed, min_steps=min_steps, max_steps=max_steps, style=style,
                               max_value=max_value, annotation_noise=annotation_noise)

    require_cot = split == "train"
    id_prefix = f"{name}_" if split == "test" else f"{name}_train_"
    kw = dict(require_cot=require_cot, id_prefix=id_prefix, skip_bad_rows=skip_bad_rows, limit=limit)
    if path is not None:
        if not os.path.isfile(path):
            raise DataNotFoundError(f"{name} {split}: the explicit path {path!r} is not a file")
        return load_file(path, style, **kw)

    found, looked = find_local_file(name, split, style, data_dir)
    if found is not None:
        logger.info("loading %s %s (%s) from %s", name, split, style, found)
        return load_file(found, style, **kw)

    if hub_applies(name, split, style):
        where = f"Hugging Face hub {HF_GSM8K[0]} (config {HF_GSM8K[1]}, split {split})"
        try:
            return _load_hub(name, split, style, require_cot, limit)
        except DataError:
            raise
        except Exception as e:  # offline, no cache, missing package, ...: report it with the rest
            msg = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
            looked.append(f"{where}: {type(e).__name__}: {msg}")
    else:
        looked.append("Hugging Face hub: not used for this dataset/split/style")

    raise DataNotFoundError(
        f"no {name} {split} data ({style} style) found. Looked in:\n  - "
        + "\n  - ".join(looked)
        + "\nPass path=, or data_dir= / set CARFT_DATA_DIR to a directory laid out as "
          "<dataset>/<file> (e.g. gsm8k/train.jsonl, svamp/svamp_nl.json)."
        + ("\n" + _python_gsm8k_note() if name == "gsm8k" and split == "train" and style == "python" else ""),
        looked=looked, name=name, split=split, style=style)


def _python_gsm8k_note() -> str:
    return ("GSM8K has no public python-style training file: ReFT's gsm8k_python_sdp.json is not obtainable "
            "(its blob is missing from every public mirror). Use style='nl', the svamp python set, or your own file.")


def hub_applies(name: str, split: str, style: str) -> bool:
    """Whether the Hugging Face hub is a fallback for this dataset / split / style (GSM8K nl, and test)."""
    return name == "gsm8k" and not (split == "train" and style == "python")


def find_local_file(name: str, split: str, style: str, data_dir: str | None) -> tuple[str | None, list[str]]:
    """The first candidate file under ``data_dir``, then ``$CARFT_DATA_DIR`` (see :data:`CANDIDATES`).

    Returns:
        ``(path or None, what was looked at)``.
    """
    looked: list[str] = []
    roots: list[tuple[str, str | None]] = []
    if data_dir is not None:
        roots.append(("data_dir", data_dir))
    env_dir = os.environ.get("CARFT_DATA_DIR") or None
    if data_dir is None or env_dir is None or os.path.abspath(env_dir) != os.path.abspath(data_dir):
        roots.append(("$CARFT_DATA_DIR", env_dir))
    for label, root in roots:
        if root is None:
            looked.append(f"{label}: not set")
            continue
        if not os.path.isdir(root):
            looked.append(f"{label}={root}: not a directory")
            continue
        for rel in CANDIDATES[(name, split, style)]:
            candidate = os.path.join(root, rel)
            if os.path.isfile(candidate):
                return candidate, looked
            looked.append(f"{label}: {candidate} (missing)")
    return None, looked


def _config_error(data_cfg, split: str, looked: list[str]) -> str:
    """One line naming the config fields that decide where ``split`` comes from."""
    field = "data.train_path" if split == "train" else "data.test_path"
    name, style = data_cfg.dataset, data_cfg.style
    files = " or ".join(CANDIDATES[(name, split, style)])
    tried = "; ".join(looked)
    line = (f"no {name} {split} data ({style} style): looked at {tried}. Set data.data_dir (DATA_DIR= in the "
            f"example scripts) or $CARFT_DATA_DIR to a folder holding {files}, or {field} to a file")
    if name == "gsm8k" and split == "train" and style == "python":
        line += ". " + _python_gsm8k_note()
    return line


def locate_from_config(data_cfg, split: str) -> str | None:
    """Where ``load_from_config`` will read ``split`` from, without reading it: the file, or None
    (the synthetic task, or the hub fallback).

    Raises:
        DataNotFoundError: one line naming ``data.train_path`` / ``data.test_path`` or
            ``data.data_dir`` and the files looked for.
    """
    if data_cfg.dataset == "synthetic":
        return None
    path = data_cfg.train_path if split == "train" else data_cfg.test_path
    if path is not None:
        if not os.path.isfile(path):
            field = "data.train_path" if split == "train" else "data.test_path"
            raise DataNotFoundError(f"config field '{field}' = {path!r}: no such file")
        return path
    found, looked = find_local_file(data_cfg.dataset, split, data_cfg.style, data_cfg.data_dir)
    if found is not None:
        return found
    if hub_applies(data_cfg.dataset, split, data_cfg.style):
        return None  # the hub may still have it (load_from_config reports it when not)
    raise DataNotFoundError(_config_error(data_cfg, split, looked))


def load_from_config(data_cfg, split: str) -> list[Record]:
    """``load_dataset`` driven by ``carft_mega.config.DataConfig``.

    Uses ``train_path``/``test_path``, ``data_dir``, ``skip_bad_rows``, ``train_limit``/``eval_limit``
    and, for the synthetic task, ``synthetic_{train,test}_size`` (capped by the limit),
    ``synthetic_{min,max}_steps`` and ``seed``.
    """
    train = split == "train"
    limit = data_cfg.train_limit if train else data_cfg.eval_limit
    if data_cfg.dataset == "synthetic":
        size = data_cfg.synthetic_train_size if train else data_cfg.synthetic_test_size
        limit = size if limit is None else min(size, limit)
    path = data_cfg.train_path if train else data_cfg.test_path
    locate_from_config(data_cfg, split)  # a missing file: one line naming the config fields
    try:
        return load_dataset(data_cfg.dataset, split, data_cfg.style, path=path,
                            data_dir=data_cfg.data_dir, skip_bad_rows=data_cfg.skip_bad_rows, limit=limit,
                            seed=data_cfg.seed, min_steps=data_cfg.synthetic_min_steps,
                            max_steps=data_cfg.synthetic_max_steps, max_value=data_cfg.synthetic_max_value,
                            annotation_noise=data_cfg.synthetic_annotation_noise)
    except DataNotFoundError as e:  # only the hub was left, and it failed too
        raise DataNotFoundError(_config_error(data_cfg, split, e.looked), looked=e.looked) from None
