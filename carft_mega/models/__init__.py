"""The CARFT policy on Megatron-Core: architecture description, model building, the CoT head,
vocab-parallel log-probs and HF <-> Megatron conversion.

Importing this package does not import megatron-core; the builders do, on first use.

    from carft_mega import parallel
    from carft_mega.models import build_policy, frozen_copy
    parallel.init_distributed(cfg.parallel, seed=cfg.seed)
    policy = build_policy(cfg.model, cfg.parallel, vocab_size=len(tokenizer))
    reference = frozen_copy(policy, cfg.model)
    out = policy(tokens, attention_mask=mask, span_masks=spans)   # PolicyOutput, state-aligned
"""

from carft_mega.models.arch import ArchSpec, arch_from_hf_config, arch_from_tiny, pad_vocab_size
from carft_mega.models.build import (build_policy, frozen_copy, export_hf, load_policy_checkpoint,
                                     load_policy_weights, save_policy_checkpoint, tokenizer_dir_of)
from carft_mega.models.logprobs import vocab_parallel_logprobs
from carft_mega.models.policy import (CoTHead, PolicyModel, PolicyOutput, build_attention_mask,
                                      left_pad_position_ids, megatron_to_batch_major)

__all__ = [
    "ArchSpec", "arch_from_hf_config", "arch_from_tiny", "pad_vocab_size",
    "build_policy", "frozen_copy", "export_hf", "load_policy_checkpoint", "load_policy_weights",
    "save_policy_checkpoint", "tokenizer_dir_of", "vocab_parallel_logprobs",
    "CoTHead", "PolicyModel", "PolicyOutput", "build_attention_mask", "left_pad_position_ids",
    "megatron_to_batch_major",
]
