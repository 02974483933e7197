"""Compare an HF model with its Megatron conversion on a few prompts (fp32).

    python tools/compare_logits.py --hf HF_DIR_OR_GGUF --ckpt CKPT_DIR --tp 1
    torchrun --nproc_per_node 2 tools/compare_logits.py --hf ... --ckpt ... --tp 2

Prints the max |delta log-prob| of the prompts' next tokens and KL(HF || Megatron) of the
next-token distributions (mean and max over positions). Exits 1 when KL exceeds --max-kl.
"""

import argparse
import json
import sys

import _common  # noqa: F401


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hf", required=True, help="HF directory or .gguf file")
    ap.add_argument("--ckpt", required=True, help="Megatron checkpoint directory")
    ap.add_argument("--tp", type=int, default=1, help="tensor-parallel size = number of processes")
    ap.add_argument("--prompt", action="append", help="a prompt (repeatable; default: a built-in set)")
    ap.add_argument("--max-kl", type=float, default=None, help="fail (exit 1) when kl_max exceeds this")
    ap.add_argument("--json", action="store_true", help="print the result as one JSON line")
    args = ap.parse_args(argv)

    from carft_mega import parallel
    from carft_mega.models.pipelines import DEFAULT_PROMPTS, compare_logits

    rank = _common.init(args.tp)
    try:
        res = compare_logits(args.hf, args.ckpt, prompts=tuple(args.prompt or DEFAULT_PROMPTS))
    finally:
        parallel.destroy()
    if rank == 0:
        if args.json:
            print(json.dumps(res))
        else:
            print(f"positions        {res['positions']}")
            print(f"max |dlogp|      {res['max_abs_dlogp']:.3e}")
            print(f"max |dlogit|     {res['max_abs_dlogit']:.3e}")
            print(f"KL(HF||Meg) mean {res['kl_mean']:.3e}")
            print(f"KL(HF||Meg) max  {res['kl_max']:.3e}")
    if args.max_kl is not None and res["kl_max"] > args.max_kl:
        print(f"FAIL: kl_max {res['kl_max']:.3e} > --max-kl {args.max_kl:.1e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
