"""The paper's comparison in one harness: SFT, ReFT, CARFT (positive / negative / both signals, and
without the embedding partial reward) and Dr.GRPO, all from **one shared SFT checkpoint**, on the
same RL budget (rollout steps x prompts; Dr.GRPO samples G = 2 per prompt, the paper's setting)
and the same N seeds. Ablations: ``--ablation coef`` (contrastive.coef in 5e-4, 1e-3, 1.5e-3, paper
Fig. 7) and ``--ablation partial`` (the embedding partial reward on vs off, Fig. 8).

    python -m carft_mega.compare --config examples/configs/quickstart.yaml --out runs/compare
    python -m carft_mega.compare --quick ...          # 1 seed, a few steps: a check of minutes
    python -m carft_mega.compare --ablation coef ...  # results_coef.{csv,md}, curves_coef.png

Every run is an ordinary run directory (``<out>/sft``, ``<out>/runs/<name>/seed<k>``) launched as
its own process (``--launcher`` for torchrun), so an interrupted comparison resumes where it
stopped and a finished run is not run again. Outputs, from the runs' ``metrics.jsonl``:

* ``results.csv``: one row per method and seed (``final_accuracy``, ``best_accuracy``,
  ``collapse`` = best - final, ``rl_seconds``, ``seconds_per_step``, ``generated_tokens``, ...);
* ``results.md``: mean +- std over seeds per method (the paper's Table 3/4 layout);
* ``curves.png``: test accuracy over RL steps, the mean per method with a min-max band.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass

from carft_mega.config import load_config

# Every RL arm: its overrides on top of the shared config. ReFT and Dr.GRPO keep ReFT's 0.1 partial
# reward; CARFT uses the embedding partial reward unless the arm says otherwise.
REFT = ["contrastive.signal=none", "reward.partial=reft"]
ARMS = {
    "reft": ("ReFT", REFT),
    "carft_pos": ("CARFT (positive)", ["contrastive.signal=positive", "reward.partial=embedding"]),
    "carft_neg": ("CARFT (negative)", ["contrastive.signal=negative", "reward.partial=embedding"]),
    "carft_both": ("CARFT (both)", ["contrastive.signal=both", "reward.partial=embedding"]),
    "carft_pos_nopartial": ("CARFT (positive, no embedding partial reward)",
                            ["contrastive.signal=positive", "reward.partial=reft"]),
    "drgrpo": ("Dr.GRPO (G=2)", ["ppo.estimator=drgrpo", "rollout.samples_per_prompt=2", *REFT]),
    "carft_pos_c5e-4": ("CARFT (positive), c = 5e-4", ["contrastive.signal=positive", "reward.partial=embedding",
                                                      "contrastive.coef=5e-4"]),
    "carft_pos_c1.5e-3": ("CARFT (positive), c = 1.5e-3", ["contrastive.signal=positive",
                                                          "reward.partial=embedding", "contrastive.coef=1.5e-3"]),
}
COMPARISON = ["sft", "reft", "carft_pos", "carft_neg", "carft_both", "carft_pos_nopartial", "drgrpo"]
ABLATIONS = {
    # carft_pos runs at the config's coef (1e-3 in the shipped configs).
    "coef": ["carft_pos_c5e-4", "carft_pos", "carft_pos_c1.5e-3"],
    "partial": ["carft_pos", "carft_pos_nopartial"],
}
# QUICK=1: every method, 1 seed, a few steps (a smoke test of the harness, not a result).
QUICK = ["sft.max_steps=10", "ppo.max_steps=2", "logging.eval_every=1", "data.eval_limit=20",
         "checkpoint.save_every=0"]
CSV_FIELDS = ["method", "name", "seed", "initial_accuracy", "final_accuracy", "best_accuracy", "collapse",
              "rl_steps", "rl_seconds", "seconds_per_step", "generated_tokens", "mean_reward", "final_kl"]


@dataclass
class Job:
    key: str
    seed: int
    out_dir: str
    overrides: list[str]


def _tokenizer_override(cfg) -> list[str]:
    """The tokenizer of the SFT run, passed to the RL runs (which load the SFT checkpoint)."""
    if cfg.model.tokenizer:
        return [f"model.tokenizer={cfg.model.tokenizer}"]
    if cfg.model.source == "tiny":
        return ["model.tokenizer=char"]
    return [f"model.tokenizer={cfg.model.path}"]


def _results(out_dir: str) -> dict | None:
    path = os.path.join(out_dir, "results.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def _launch(launcher: list[str], config: str, overrides: list[str], log_path: str) -> None:
    cmd = [*launcher, "--config", config, *overrides]
    print(f"compare: {' '.join(shlex.quote(c) for c in cmd)}", flush=True)
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    with open(log_path, "a") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        with open(log_path) as f:
            tail = f.read()[-3000:]
        raise RuntimeError(f"run failed (exit {proc.returncode}); log {log_path}:\n{tail}")


def _rows(out_dir: str, stage: str) -> list[dict]:
    path = os.path.join(out_dir, "metrics.jsonl")
    with open(path) as f:
        return [r for r in map(json.loads, f) if r.get("stage") == stage]


def _num(v) -> float:
    return float(v) if isinstance(v, (int, float)) else float("nan")


def summarize_run(key: str, seed: int, out_dir: str, sft_out: str) -> tuple[dict, list[tuple[int, float]]]:
    """One CSV row and the accuracy curve ``[(rl_step, accuracy)]`` of a finished run."""
    if key == "sft":
        res = _results(sft_out)
        acc = res["sft_accuracy"]
        return ({"method": "sft", "name": "SFT", "seed": seed, "initial_accuracy": acc, "final_accuracy": acc,
                 "best_accuracy": acc, "collapse": 0.0, "rl_steps": 0, "rl_seconds": 0.0, "seconds_per_step": 0.0,
                 "generated_tokens": 0, "mean_reward": float("nan"), "final_kl": 0.0}, [(0, acc)])
    res = _results(out_dir)
    rows = _rows(out_dir, "carft")
    steps = [r for r in rows if "loss" in r]
    curve = sorted({r["step"]: r["eval/accuracy"] for r in rows if "eval/accuracy" in r}.items())
    rl_evals = [a for s, a in curve if s > 0]
    seconds = sum(_num(r.get("time/step")) for r in steps)
    final = res["carft_accuracy"]
    best = max(rl_evals) if rl_evals else final
    initial = dict(curve).get(0, float("nan"))
    return ({"method": key, "name": ARMS[key][0], "seed": seed, "initial_accuracy": initial,
             "final_accuracy": final, "best_accuracy": best, "collapse": best - final, "rl_steps": len(steps),
             "rl_seconds": seconds, "seconds_per_step": seconds / max(1, len(steps)),
             "generated_tokens": int(sum(_num(r.get("rollout/tokens")) for r in steps)),
             "mean_reward": sum(_num(r.get("reward/score")) for r in steps) / max(1, len(steps)),
             "final_kl": _num(steps[-1].get("rollout/kl")) if steps else float("nan")}, curve)


def _mean_std(xs: list[float]) -> tuple[float, float]:
    xs = [x for x in xs if not math.isnan(x)]
    if not xs:
        return float("nan"), float("nan")
    m = sum(xs) / len(xs)
    s = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return m, s


def write_tables(rows: list[dict], keys: list[str], csv_path: str, md_path: str, title: str, note: str) -> None:
    with open(csv_path + ".tmp", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        w.writeheader()
        for r in rows:
            w.writerow({k: r[k] for k in CSV_FIELDS})
    os.replace(csv_path + ".tmp", csv_path)
    seeds = sorted({r["seed"] for r in rows})
    lines = [f"# {title}", "", note, "",
             f"Mean +- std over {len(seeds)} seed(s) ({', '.join(map(str, seeds))}); accuracies in %.", "",
             "| method | final acc. | best acc. | collapse (best - final) | s / RL step | generated tokens |",
             "|---|---|---|---|---|---|"]
    for key in keys:
        rs = [r for r in rows if r["method"] == key]
        if not rs:
            continue
        cells = []
        for field, scale, fmt in (("final_accuracy", 100, "{:.1f} +- {:.1f}"), ("best_accuracy", 100, "{:.1f} +- {:.1f}"),
                                  ("collapse", 100, "{:.1f} +- {:.1f}"), ("seconds_per_step", 1, "{:.2f} +- {:.2f}"),
                                  ("generated_tokens", 1, "{:.0f} +- {:.0f}")):
            m, s = _mean_std([float(r[field]) * scale for r in rs])
            cells.append(fmt.format(m, s))
        lines.append(f"| {rs[0]['name']} | " + " | ".join(cells) + " |")
    with open(md_path + ".tmp", "w") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(md_path + ".tmp", md_path)


def plot_curves(curves: dict[str, list[list[tuple[int, float]]]], names: dict[str, str], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5))
    last = max((s for runs in curves.values() for run in runs for s, _ in run), default=1)
    for key, runs in curves.items():
        if key == "sft":  # the shared starting point: a reference line across the RL steps
            ax.axhline(runs[0][0][1] * 100, color="k", ls="--", lw=1, label=names[key])
            continue
        steps = sorted({s for run in runs for s, _ in run})
        per_step = [[dict(run)[s] * 100 for run in runs if s in dict(run)] for s in steps]
        mean = [sum(v) / len(v) for v in per_step]
        line, = ax.plot(steps, mean, marker="o", ms=3, label=names[key])
        if len(runs) > 1:
            ax.fill_between(steps, [min(v) for v in per_step], [max(v) for v in per_step], alpha=0.15,
                            color=line.get_color())
    ax.set_xlim(0, last)
    ax.set_xlabel("RL step")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path + ".tmp.png", dpi=120)
    plt.close(fig)
    os.replace(path + ".tmp.png", path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m carft_mega.compare", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="examples/configs/quickstart.yaml", help="the shared config (SFT and RL)")
    p.add_argument("--out", default="runs/compare", help="comparison directory")
    p.add_argument("--seeds", type=int, default=3, help="RL seeds per method (ignored with --quick: 1)")
    p.add_argument("--quick", action="store_true", help="1 seed, a few steps: checks the harness in minutes")
    p.add_argument("--ablation", choices=sorted(ABLATIONS), help="run an ablation instead of the comparison")
    p.add_argument("--eval-every", type=int, default=None,
                   help="greedy test accuracy every N RL steps (the curves' points; default: the config's)")
    p.add_argument("--launcher", default=None,
                   help="command that runs one training process, e.g. 'torchrun --nproc_per_node 8 -m "
                        "carft_mega.train' (default: this Python with -m carft_mega.train)")
    p.add_argument("overrides", nargs="*", help="section.field=value overrides for every run")
    args = p.parse_args(argv)

    launcher = shlex.split(args.launcher) if args.launcher else [sys.executable, "-m", "carft_mega.train"]
    common = list(args.overrides) + (QUICK if args.quick else [])
    if args.eval_every is not None and not args.quick:
        common.append(f"logging.eval_every={args.eval_every}")
    base = load_config(args.config, common)  # fails here, naming the field, before any run starts
    seeds = [base.seed] if args.quick else [base.seed + k for k in range(args.seeds)]
    keys = ABLATIONS[args.ablation] if args.ablation else COMPARISON
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    started = time.time()

    sft_out = os.path.join(out, "sft")
    if _results(sft_out) is None:
        _launch(launcher, args.config, common + [f"out_dir={sft_out}", "ppo.enabled=false", "checkpoint.resume=auto"],
                os.path.join(sft_out, "train.log"))
    sft = _results(sft_out)
    print(f"compare: SFT checkpoint {sft['sft_checkpoint']} (test accuracy {sft['sft_accuracy']:.4f})", flush=True)
    rl_common = common + ["sft.enabled=false", "model.source=mcore", f"model.path={sft['sft_checkpoint']}",
                          *_tokenizer_override(base), "checkpoint.resume=auto"]
    jobs = [Job(k, s, os.path.join(out, "runs", k, f"seed{s}"), ARMS[k][1]) for k in keys if k != "sft"
            for s in seeds]
    for i, job in enumerate(jobs, 1):
        if _results(job.out_dir) is not None:
            print(f"compare: [{i}/{len(jobs)}] {job.key} seed {job.seed}: done earlier", flush=True)
            continue
        print(f"compare: [{i}/{len(jobs)}] {job.key} seed {job.seed} ({time.time() - started:.0f} s so far)", flush=True)
        _launch(launcher, args.config, rl_common + job.overrides + [f"seed={job.seed}", f"out_dir={job.out_dir}"],
                os.path.join(job.out_dir, "train.log"))

    rows, curves = [], {}
    for key in keys:
        for s in seeds:
            row, curve = summarize_run(key, s, os.path.join(out, "runs", key, f"seed{s}"), sft_out)
            rows.append(row)
            curves.setdefault(key, []).append(curve)
    suffix = f"_{args.ablation}" if args.ablation else ""
    what = f"ablation: {args.ablation}" if args.ablation else "SFT vs ReFT vs CARFT vs Dr.GRPO"
    budget = f"{base.ppo.max_steps} RL steps" if base.ppo.max_steps else f"{base.ppo.epochs:g} RL epochs"
    note = (f"Config `{args.config}`{' with QUICK=1' if args.quick else ''}, overrides "
            f"`{' '.join(args.overrides) or '-'}`. Every run: {budget} of {base.ppo.rollout_batch_size} prompts "
            f"(Dr.GRPO: 2 samples each), from one shared SFT checkpoint (`{os.path.relpath(sft['sft_checkpoint'], out)}`, "
            f"test accuracy {100 * sft['sft_accuracy']:.1f}%). Best accuracy is over the RL evaluations "
            f"(every {base.logging.eval_every} steps and the last).")
    write_tables(rows, keys, os.path.join(out, f"results{suffix}.csv"), os.path.join(out, f"results{suffix}.md"),
                 what, note)
    names = {k: ("SFT" if k == "sft" else ARMS[k][0]) for k in keys}
    plot_curves(curves, names, os.path.join(out, f"curves{suffix}.png"), what)
    print(f"compare: wrote {out}/results{suffix}.csv, results{suffix}.md, curves{suffix}.png "
          f"in {time.time() - started:.0f} s", flush=True)
    with open(os.path.join(out, f"results{suffix}.md")) as f:
        print(f.read(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
