"""HF checkpoint (safetensors directory or GGUF file) -> Megatron dist_checkpointing directory.

    python tools/convert_hf_to_megatron.py --hf HF_DIR_OR_GGUF --out CKPT_DIR --tp 1 [--dtype fp32]
    torchrun --nproc_per_node 2 tools/convert_hf_to_megatron.py --hf ... --out ... --tp 2

The checkpoint loads at any TP. ``CKPT_DIR/carft_arch.json`` describes the model and
``CKPT_DIR/tokenizer/`` holds the tokenizer. See docs/conversion.md.
"""

import argparse

import _common  # noqa: F401  (puts the repository on sys.path)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hf", required=True, help="HF directory (config.json + *.safetensors) or a .gguf file")
    ap.add_argument("--out", required=True, help="output directory (must be empty or missing)")
    ap.add_argument("--tp", type=int, default=1, help="tensor-parallel size = number of processes")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="weights dtype")
    ap.add_argument("--cot-proj-dim", type=int, default=64, help="d of the CoT head (when no v_head.safetensors)")
    ap.add_argument("--seed", type=int, default=1234, help="CoT head init seed (when no v_head.safetensors)")
    args = ap.parse_args(argv)

    from carft_mega import parallel
    from carft_mega.models.pipelines import convert_hf_to_megatron

    rank = _common.init(args.tp)
    try:
        convert_hf_to_megatron(args.hf, args.out, dtype=args.dtype, cot_proj_dim=args.cot_proj_dim, seed=args.seed)
        if rank == 0:
            print(f"wrote Megatron checkpoint {args.out} (tp={args.tp}, dtype={args.dtype})")
    finally:
        parallel.destroy()


if __name__ == "__main__":  # the guard matters: dist_checkpointing's writer re-imports __main__
    main()
