"""What a person watching a run sees: progress-bar labels, TensorBoard tags and x axis, the KL that
compare_logits prints (issue 13, item 7), and the same metrics in wandb (item 9)."""

import json

import pytest
import torch

from carft_mega.models.pipelines import kl_per_position
from carft_mega.trainer.metrics import BAR_LABELS, MetricsLogger


def _events(tb_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir))
    acc.Reload()
    return {tag: acc.Scalars(tag) for tag in acc.Tags()["scalars"]}


def test_bar_labels_tensorboard_tags_and_one_run_step_axis(tmp_path):
    log = MetricsLogger(str(tmp_path), tensorboard=True, progress_bar=True, plot=False)
    log.set_stage_offsets(3)  # 3 SFT steps, then RL step s at x = 3 + s
    log.start_stage("sft", 3)
    for s in (1, 2, 3):
        log.log("sft", s, {"sft/loss": 2.0 / s, "optim/lr": 1e-3})
    log.log("sft", 3, {"eval/accuracy": 0.125}, advance=False)
    log.start_stage("carft", 2)
    log.log("carft", 1, {"loss": 1.5, "contrastive/loss": 0.25, "reward/accuracy": 0.5, "eval/accuracy": 0.375,
                         "optim/lr": 1e-4})
    postfix = log._bar.postfix
    log.close()
    # The bar shows the total loss as `loss` and the contrastive one under its own label; the two
    # accuracies are told apart.
    assert "loss=1.5" in postfix and "cl_loss=0.25" in postfix, postfix
    assert "train_acc=0.5" in postfix and "test_acc=0.375" in postfix, postfix
    assert len(set(BAR_LABELS.values())) == len(BAR_LABELS) - 1  # only sft/loss and loss share `loss`
    ev = _events(tmp_path / "tb")
    # Tags are the metrics.jsonl names: no doubled stage prefix, no wall-clock "time" scalar.
    assert set(ev) == {"sft/loss", "optim/lr", "eval/accuracy", "loss", "contrastive/loss", "reward/accuracy"}
    assert [e.step for e in ev["sft/loss"]] == [1, 2, 3]
    assert [e.step for e in ev["loss"]] == [4]  # RL step 1 follows SFT step 3
    assert [(e.step, e.value) for e in ev["eval/accuracy"]] == [(3, 0.125), (4, 0.375)]
    assert [e.step for e in ev["optim/lr"]] == [1, 2, 3, 4]  # one curve across both stages
    with open(tmp_path / "metrics.jsonl") as f:
        rows = [json.loads(x) for x in f]
    assert ev["loss"][0].wall_time == rows[-1]["time"]  # the wall time is the event's, not a scalar


def test_compare_logits_kl_is_never_negative():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 4096, generator=g) * 3
    lp_p = torch.log_softmax(logits, -1)
    lp_q = torch.log_softmax(logits + 1e-7 * torch.randn(64, 4096, generator=g), -1)
    raw = (lp_p.exp() * (lp_p - lp_q)).sum(-1)
    assert (raw < 0).any()  # the fp32 rounding that printed KL = -3.6e-09
    kl = kl_per_position(lp_p, lp_q)
    assert (kl >= 0).all() and torch.equal(kl, raw.clamp(min=0))
    far = kl_per_position(lp_p, torch.log_softmax(torch.zeros_like(logits), -1))
    assert (far > 0.1).all()  # a real divergence is untouched


# --------------------------------------------------------------------------------------------
# wandb (issue 13, item 9): offline, no account; the same metrics as TensorBoard, and the config


def read_wandb_records(path):
    """The protobuf records of an offline wandb run file (``run-<id>.wandb``: a LevelDB-style log of
    32 KiB blocks, records split in FULL / FIRST / MIDDLE / LAST chunks with a 7-byte header)."""
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    data = open(path, "rb").read()
    assert data[:4] == b":W&B", data[:8]
    pos, block, out, buf = 7, 32768, [], b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # block trailer padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:
            break
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        buf = chunk if kind in (1, 2) else buf + chunk
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(buf)
            out.append(rec)
    return out


def test_wandb_logs_what_tensorboard_logs_offline(tmp_path, monkeypatch):
    import glob

    from tests.trainer.test_e2e import run_in_process

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    run_in_process(str(out), "sft.max_steps=2", "ppo.max_steps=1", "logging.tensorboard=true", "logging.wandb=true",
                   "logging.wandb_project=carft_test", "logging.wandb_tags=tiny,ci", "logging.wandb_run_name=w1")
    files = glob.glob(str(out / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert len(files) == 1, files
    records = read_wandb_records(files[0])
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    assert run.project == "carft_test" and run.display_name == "w1" and list(run.tags) == ["tiny", "ci"]
    assert run.run_id == (out / "wandb_run_id").read_text().strip()
    config = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in run.config.update}
    assert config["ppo"]["max_steps"] == 1 and config["out_dir"] == str(out)  # the resolved config
    history = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            row = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
            for k, v in row.items():
                if not k.startswith("_") and k != "run_step":
                    history.setdefault(k, []).append((row["run_step"], v))
    tb = _events(out / "tb")
    assert set(history) == set(tb)  # the same metric names
    for tag, events in tb.items():
        assert [s for s, _ in history[tag]] == [e.step for e in events], tag  # on the same x axis
        assert [v for _, v in history[tag]] == pytest.approx([e.value for e in events], rel=1e-6), tag
    assert [s for s, _ in history["loss"]] == [3]  # RL step 1 after 2 SFT steps


def test_wandb_missing_is_one_line_naming_the_package_and_field(tmp_path, capsys, monkeypatch):
    import sys

    from carft_mega.train import main
    from tests.trainer.test_e2e import TINY

    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` fails as if it were not installed
    rc = main(TINY + [f"out_dir={tmp_path / 'run'}", "logging.wandb=true"])
    err = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error: ")]
    assert rc == 2 and len(err) == 1 and "'logging.wandb'" in err[0] and "'wandb' package" in err[0], err
    assert not (tmp_path / "run").exists()  # found before anything was written
