"""Loaders on the real data files (counts from ../shared/data/SOURCES.md), on malformed files, and
the search order / not-found report."""

import json
import logging
import os
import subprocess
import sys

import pytest

from carft_mega.data import DataError, DataNotFoundError, Record, load_dataset, load_file, read_file_records
from carft_mega.data import loaders as loaders_mod

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DATA_DIR = os.environ.get("CARFT_DATA_DIR") or os.path.join(REPO, "..", "shared", "data")
needs_data = pytest.mark.skipif(not os.path.isdir(os.path.join(DATA_DIR, "gsm8k")),
                                reason=f"no data directory at {DATA_DIR} (set CARFT_DATA_DIR)")


def _strip_annotations(text):
    """Remove every <<...>> span with a plain scan (independent of the loader's regex)."""
    out, i = [], 0
    while i < len(text):
        if text.startswith("<<", i):
            j = text.find(">>", i + 2)
            assert j >= 0, "unterminated annotation"
            i = j + 2
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


# ----------------------------------------------------------------------------------------- real data

@needs_data
@pytest.mark.parametrize("name,split,style,count", [
    ("gsm8k", "train", "nl", 7473), ("gsm8k", "test", "nl", 1319), ("gsm8k", "test", "python", 1319),
    ("svamp", "train", "nl", 3076), ("svamp", "train", "python", 3043), ("svamp", "test", "nl", 1000),
])
def test_real_counts_and_values(name, split, style, count):
    recs = load_dataset(name, split, style, data_dir=DATA_DIR)
    assert len(recs) == count
    assert len({r.id for r in recs}) == count
    for r in recs:
        assert isinstance(r, Record) and r.style == style
        assert "," not in r.answer_text and float(r.answer_text) == r.answer
        assert r.question.strip()
        if split == "train":
            assert r.cot and r.cot.strip()
            assert "<<" not in r.cot and ">>" not in r.cot
            if style == "python":
                assert "def solution(" in r.cot
        elif name == "svamp" or style == "python":
            assert r.cot is None


@needs_data
def test_gsm8k_train_matches_raw_file():
    recs = load_dataset("gsm8k", "train", data_dir=DATA_DIR)
    with open(os.path.join(DATA_DIR, "gsm8k", "train.jsonl")) as f:
        raw = [json.loads(line) for line in f if line.strip()]
    assert len(raw) == len(recs)
    n_annotated = 0
    for rec, row in zip(recs, raw):
        cot, value = row["answer"].split("####")
        n_annotated += "<<" in cot
        assert rec.question == row["question"]
        assert rec.cot == _strip_annotations(cot).strip()
        assert rec.answer == float(value.strip().replace(",", ""))
    assert n_annotated == 7378  # SOURCES.md: 7,378 of 7,473 answers carry calculator annotations


@needs_data
def test_reft_gsm8k_test_agrees_with_official():
    official = load_dataset("gsm8k", "test", data_dir=DATA_DIR)
    reft = load_file(os.path.join(DATA_DIR, "gsm8k", "gsm8k_test_set.json"))
    assert len(reft) == len(official) == 1319
    n_exact = 0
    for a, b in zip(official, reft):
        assert a.answer == b.answer and a.id == b.id  # ids gsm8k_<i> in both
        n_exact += a.question == b.question
        assert a.question.replace("\xa0", " ") == b.question.replace("\xa0", " ")
        assert b.cot is None
    assert n_exact == 1316


# ----------------------------------------------------------------------------------------- malformed

GOOD_JSONL = '{"question": "q1?", "answer": "a <<1+1=2>>2\\n#### 2"}'
GOOD_ROW = {"item_id": "x_0", "question": "q?", "answer_cot": "c", "answer_value": "3"}


def _write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


@pytest.mark.parametrize("bad_line,reason", [
    ('{"question": "q2?", "answer": "x\\n#### 4"', "invalid JSON"),
    ('{"answer": "x\\n#### 4"}', "missing field 'question'"),
    ('{"question": "q2?", "answer": "x\\n#### four"}', "not numeric"),
    ('{"question": "q2?", "answer": "x 4"}', "####"),
    ('{"question": 7, "answer": "x\\n#### 4"}', "must be str"),
    ('{"question": "q2?", "answer": "x\\n#### nan"}', "not finite"),
    ('["question", "answer"]', "expected a JSON object"),
    ('{"question": "q2?"}', "missing field 'answer_value'"),
])
def test_malformed_jsonl_row(tmp_path, caplog, bad_line, reason):
    path = _write(tmp_path, "bad.jsonl", "\n".join([GOOD_JSONL, bad_line, GOOD_JSONL, bad_line, GOOD_JSONL]) + "\n")
    with pytest.raises(DataError) as e:
        load_file(path, require_cot=True)
    assert path in str(e.value) and "line 2" in str(e.value) and reason in str(e.value)
    recs, bad = read_file_records(path, require_cot=True, skip_bad_rows=True)
    assert len(recs) == 3 and [w for w, _ in bad] == ["line 2", "line 4"]
    with caplog.at_level(logging.WARNING, logger="carft_mega.data.loaders"):
        assert len(load_file(path, require_cot=True, skip_bad_rows=True)) == 3
    summary = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert len(summary) == 1 and "skipped 2 malformed rows" in summary[0] and "line 2, line 4" in summary[0]


@pytest.mark.parametrize("bad_row,reason,style,require_cot", [
    ({"item_id": "x_1", "question": "q?", "answer_cot": "c"}, "missing field 'answer_value'", "nl", True),
    ({"item_id": "x_1", "question": "q?", "answer_cot": "c", "answer_value": "abc"}, "not numeric", "nl", True),
    ({"item_id": "x_1", "question": "q?", "answer_cot": ["c"], "answer_value": "1"}, "must be str", "nl", True),
    ({"item_id": "x_1", "question": "q?", "answer_cot": "c", "answer_value": True}, "must be", "nl", True),
    ({"item_id": "x_1", "question": "  ", "answer_cot": "c", "answer_value": "1"}, "empty", "nl", True),
    ({"item_id": "x_1", "question": "q?", "answer_value": "1"}, "answer_cot", "nl", True),
    ({"item_id": "x_1", "question": "q?", "answer_cot": "x = 1", "answer_value": "1"}, "def solution(", "python", True),
    ("just a string", "expected a JSON object", "nl", False),
])
def test_malformed_json_row(tmp_path, caplog, bad_row, reason, style, require_cot):
    good = dict(GOOD_ROW, answer_cot='def solution():\n    return 3' if style == "python" else "c")
    rows = [good, bad_row, good, good, bad_row]
    path = _write(tmp_path, "bad.json", json.dumps(rows))
    with pytest.raises(DataError) as e:
        load_file(path, style, require_cot=require_cot)
    msg = str(e.value)
    assert path in msg and "index 1" in msg and reason in msg
    if isinstance(bad_row, dict):
        assert "x_1" in msg
    recs, bad = read_file_records(path, style, require_cot=require_cot, skip_bad_rows=True)
    assert len(recs) == 3 and [w for w, _ in bad] == ["index 1", "index 4"]
    with caplog.at_level(logging.WARNING, logger="carft_mega.data.loaders"):
        load_file(path, style, require_cot=require_cot, skip_bad_rows=True)
    assert any("skipped 2 malformed rows" in r.getMessage() and "index 1, index 4" in r.getMessage()
               for r in caplog.records)


@pytest.mark.parametrize("text,reason", [
    ('[{"question": "q", "answer_value": "1"},', "not valid JSON"),
    ("", "empty"),
    ('{\n "data": []\n}', "one JSON object"),
    ("[]", "no usable records"),
])
def test_malformed_whole_file(tmp_path, text, reason):
    path = _write(tmp_path, "f.json", text)
    with pytest.raises(DataError) as e:
        load_file(path, skip_bad_rows=True)
    assert path in str(e.value) and reason in str(e.value)


def test_skip_bad_rows_summary_lists_first_rows_only(tmp_path, caplog):
    lines = [GOOD_JSONL] + ["{bad"] * 8
    path = _write(tmp_path, "many.jsonl", "\n".join(lines))
    with caplog.at_level(logging.WARNING, logger="carft_mega.data.loaders"):
        assert len(load_file(path, skip_bad_rows=True)) == 1
    (msg,) = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert "skipped 8 malformed rows" in msg and "line 2, line 3, line 4, line 5, line 6, ..." in msg
    assert "line 7" not in msg


def test_non_utf8_file(tmp_path):
    p = tmp_path / "latin.jsonl"
    p.write_bytes(b'{"question": "caf\xe9", "answer": "#### 1"}\n')
    with pytest.raises(DataError, match="not UTF-8"):
        load_file(str(p))


def test_gsm8k_row_cleaning(tmp_path):
    path = _write(tmp_path, "g.jsonl", json.dumps({"question": "Q?", "answer":
                  "He pays 3*4 = <<3*4=12>>12.\nTotal 1,000+12 = <<1000+12=1012>>1012\n#### 1,012"}) + "\n")
    (rec,) = load_file(path, require_cot=True)
    assert rec.cot == "He pays 3*4 = 12.\nTotal 1,000+12 = 1012"
    assert rec.answer == 1012.0 and rec.answer_text == "1012" and rec.id == "row_0"
    (rec_py,) = load_file(path, "python")
    assert rec_py.cot is None and rec_py.style == "python"


# ----------------------------------------------------------------------------------------- search order

def _svamp_dir(root, value):
    os.makedirs(root / "svamp")
    (root / "svamp" / "svamp_nl.json").write_text(json.dumps([dict(GOOD_ROW, answer_value=value)]))
    return str(root)


def test_search_order(tmp_path, monkeypatch):
    a = _svamp_dir(tmp_path / "a", "1")
    b = _svamp_dir(tmp_path / "b", "2")
    explicit = _write(tmp_path, "explicit.json", json.dumps([dict(GOOD_ROW, answer_value="3")]))
    monkeypatch.setenv("CARFT_DATA_DIR", b)
    assert load_dataset("svamp", "train", data_dir=a)[0].answer == 1.0
    assert load_dataset("svamp", "train")[0].answer == 2.0
    assert load_dataset("svamp", "train", data_dir=str(tmp_path / "empty"))[0].answer == 2.0
    assert load_dataset("svamp", "train", data_dir=a, path=explicit)[0].answer == 3.0
    with pytest.raises(DataNotFoundError, match="nope.json"):
        load_dataset("svamp", "train", path=str(tmp_path / "nope.json"))


def test_not_found_lists_every_place(tmp_path, monkeypatch):
    d1, d2 = tmp_path / "d1", tmp_path / "d2"
    d1.mkdir()
    d2.mkdir()
    monkeypatch.setenv("CARFT_DATA_DIR", str(d2))

    def offline(*args, **kwargs):
        raise ConnectionError("offline (test)")

    monkeypatch.setattr(loaders_mod, "_load_hub", offline)
    with pytest.raises(DataNotFoundError) as e:
        load_dataset("gsm8k", "train", data_dir=str(d1))
    msg = str(e.value)
    for expected in (f"{d1}/gsm8k/train.jsonl", f"{d1}/gsm8k/gsm8k_nl.json", f"{d2}/gsm8k/train.jsonl",
                     f"{d2}/gsm8k/gsm8k_nl.json", "openai/gsm8k", "ConnectionError: offline (test)"):
        assert expected in msg
    with pytest.raises(DataNotFoundError) as e:
        load_dataset("gsm8k", "train", "python", data_dir=str(d1))
    assert "gsm8k_python_sdp.json" in str(e.value) and "no public python-style training file" in str(e.value)
    monkeypatch.delenv("CARFT_DATA_DIR")
    with pytest.raises(DataNotFoundError) as e:
        load_dataset("svamp", "test")
    assert "$CARFT_DATA_DIR: not set" in str(e.value) and "hub: not used" in str(e.value)


def test_hub_fallback_offline_subprocess(tmp_path):
    """The real `datasets` call, offline with an empty cache: fails without downloading, and the
    error lists the data directory, $CARFT_DATA_DIR and the hub."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "CARFT_"))}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HOME=str(tmp_path / "hf"),
               CARFT_DATA_DIR=str(tmp_path / "env"), PYTHONPATH=REPO)
    code = ("from carft_mega.data import load_dataset, DataNotFoundError\n"
            "try:\n    load_dataset('gsm8k', 'test', data_dir=%r)\n"
            "except DataNotFoundError as e:\n    print(e)\nelse:\n    print('LOADED')\n") % str(tmp_path / "dd")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "LOADED" not in out.stdout
    for expected in (str(tmp_path / "dd"), str(tmp_path / "env"), "Hugging Face hub openai/gsm8k"):
        assert expected in out.stdout
    assert not list((tmp_path / "hf").rglob("*.arrow"))  # nothing was downloaded into the cache


def test_argument_validation():
    with pytest.raises(ValueError, match="dataset name"):
        load_dataset("mathqa", "train")
    with pytest.raises(ValueError, match="split"):
        load_dataset("gsm8k", "dev")
    with pytest.raises(ValueError, match="style"):
        load_dataset("gsm8k", "train", "latex")
    with pytest.raises(ValueError, match="no path"):
        load_dataset("synthetic", "train", path="x.json")


def test_load_from_config(tmp_path):
    from carft_mega.config import DataConfig
    from carft_mega.data import load_from_config

    cfg = DataConfig(dataset="synthetic", synthetic_train_size=40, synthetic_test_size=10, train_limit=25,
                     synthetic_min_steps=2, synthetic_max_steps=2, seed=3)
    train, test = load_from_config(cfg, "train"), load_from_config(cfg, "test")
    assert len(train) == 25 and len(test) == 10
    assert train == load_dataset("synthetic", "train", limit=25, seed=3, min_steps=2, max_steps=2)
    assert all(r.cot.count("\n") == 1 for r in train)
    explicit = _write(tmp_path, "t.json", json.dumps([dict(GOOD_ROW, item_id=f"x_{i}") for i in range(5)]))
    cfg = DataConfig(dataset="svamp", test_path=explicit, eval_limit=3)
    assert [r.id for r in load_from_config(cfg, "test")] == ["x_0", "x_1", "x_2"]


@needs_data
@pytest.mark.parametrize("name", ["gsm8k", "svamp"])
def test_real_targets_extract_to_their_answer(name):
    from carft_mega.data import build_prompt, build_target
    from carft_mega.reward import parse_nl_answer

    for r in load_dataset(name, "train", data_dir=DATA_DIR):
        assert parse_nl_answer(build_prompt(r) + build_target(r)) == r.answer, r.id
