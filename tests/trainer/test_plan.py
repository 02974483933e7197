"""The plan a run prints before its first step (``trainer/plan.py``) and the ``SMOKE=1`` preset of
the example scripts: the paper's GSM8K job on a CPU is said not to finish and points to SMOKE=1;
the SMOKE=1 job of the same script is small enough not to be warned about. The counts are checked
against arithmetic on the config file, not against the trainer's own step functions."""

import math
import os
import subprocess
from types import SimpleNamespace

import torch
import yaml

from carft_mega.config import load_config
from carft_mega.data.tokenizers import load_tokenizer
from carft_mega.trainer.context import load_data
from carft_mega.trainer.plan import SMOKE_HINT, print_plan
from tests.trainer.test_errors import smollm2_gguf

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DATA = os.environ.get("CARFT_DATA_DIR") or os.path.join(REPO, "..", "shared", "data")
CONFIG = os.path.join(REPO, "examples", "configs", "carft_gsm8k.yaml")


def smoke_args():
    """``SMOKE_ARGS`` exactly as ``examples/_launch.sh`` builds them for SMOKE=1."""
    script = 'source examples/_launch.sh >/dev/null && SMOKE=1 smoke_overrides >/dev/null && printf "%s\\n" "${SMOKE_ARGS[@]}"'
    out = subprocess.run(["bash", "-c", script], cwd=REPO, capture_output=True, text=True, check=True,
                         env=dict(os.environ, PYTHON="true")).stdout  # PYTHON: no GPU probe needed here
    return out.split()


def plan_lines(overrides, tokenizer):
    gguf = smollm2_gguf()
    cfg = load_config(CONFIG, ["model.source=hf", f"model.path={gguf}", f"data.data_dir={DATA}", *overrides])
    train, test = load_data(cfg)
    lines = []
    run = SimpleNamespace(cfg=cfg, train=train, test=test, tokenizer=tokenizer, resume=None,
                          ckpts=SimpleNamespace(root="/tmp/x/checkpoints"), device=torch.device("cpu"),
                          print=lines.append)
    plan = print_plan(run)
    return cfg, len(train), plan, lines


def test_paper_job_on_cpu_says_it_will_not_finish_and_smoke_is_small():
    gguf = smollm2_gguf()
    tok = load_tokenizer(os.path.dirname(gguf), gguf_file=os.path.basename(gguf))
    raw = yaml.safe_load(open(CONFIG))

    cfg, n, plan, lines = plan_lines([], tok)
    sft_steps = math.ceil(raw["sft"]["epochs"] * n / raw["sft"]["global_batch_size"])
    rl_steps = raw["ppo"]["epochs"] * (n // raw["ppo"]["rollout_batch_size"])
    text = "\n".join(lines)
    assert f"plan: SFT {sft_steps:,} steps x 64 sequences = {sft_steps * 64:,} sequences" in text, text
    assert f"{rl_steps:,} rollout steps x 64 prompts x 1 sample(s) = {rl_steps * 64:,} rollouts" in text, text
    assert "will not finish" in text and SMOKE_HINT in text
    assert (plan.sft_steps, plan.rl_steps) == (sft_steps, rl_steps)

    args = smoke_args()
    assert "sft.max_steps=4" in args and "ppo.max_steps=2" in args
    cfg, n, plan, lines = plan_lines(args, tok)
    text = "\n".join(lines)
    assert n == 16 and "plan: SFT 4 steps x 4 sequences = 16 sequences" in text, text
    assert "2 rollout steps x 4 prompts x 1 sample(s) = 8 rollouts of up to 48 new tokens" in text, text
    assert "will not finish" not in text

    # The estimate after the first timed steps: 2 steps of 10 s, 2 left of 4.
    said = []
    run = SimpleNamespace(print=said.append)
    plan.observe(run, "sft", 1, 12.0)
    assert said == []  # the first step includes warm-up: no estimate yet
    plan.observe(run, "sft", 2, 10.0)
    assert said and said[0].startswith("estimate: SFT 10 s/step (step 2) -> about 20 s for the remaining 2 of 4 steps")
