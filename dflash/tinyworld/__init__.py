"""Tiny world: a small deterministic corpus, BPE tokenizer and Qwen3 target model
that the DFlash tests and benchmarks run on without network access or a GPU."""

from .corpus import Corpus, build_corpus, chat_prompt, chat_sample
from .tokenizer import MASK_TOKEN, SPECIAL_TOKENS, train_tokenizer
from .target import distillation_prompts, greedy_continuations, make_target_config, train_target

__all__ = ["Corpus", "build_corpus", "chat_prompt", "chat_sample", "MASK_TOKEN", "SPECIAL_TOKENS",
           "train_tokenizer", "distillation_prompts", "greedy_continuations", "make_target_config",
           "train_target"]
