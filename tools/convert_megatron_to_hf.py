"""Megatron checkpoint -> HF directory loadable by ``AutoModelForCausalLM.from_pretrained``.

    python tools/convert_megatron_to_hf.py --ckpt CKPT_DIR --out HF_DIR [--dtype bf16]

Writes config.json, model.safetensors, the tokenizer files and the CoT head as
``v_head.safetensors`` (TRL names ``v_head.proj.weight`` ...). Any saved TP loads here.
See docs/conversion.md.
"""

import argparse

import _common  # noqa: F401


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", required=True, help="Megatron checkpoint directory (with carft_arch.json)")
    ap.add_argument("--out", required=True, help="HF output directory")
    ap.add_argument("--tp", type=int, default=1, help="load with this TP (= number of processes)")
    ap.add_argument("--dtype", default=None, choices=["fp32", "bf16", "fp16"], help="cast the weights")
    args = ap.parse_args(argv)

    from carft_mega import parallel
    from carft_mega.models.pipelines import convert_megatron_to_hf

    rank = _common.init(args.tp)
    try:
        convert_megatron_to_hf(args.ckpt, args.out, dtype=args.dtype)
        if rank == 0:
            print(f"wrote HF checkpoint {args.out}")
    finally:
        parallel.destroy()


if __name__ == "__main__":
    main()
