"""carft_mega: a Megatron-Core trainer for CARFT (contrastive, annotated-CoT reinforced fine-tuning,
arXiv 2508.15868) and ReFT (its special case with the contrastive term off)."""

__version__ = "0.1.0"
