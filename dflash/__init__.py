"""dflash: DFlash block-diffusion speculative decoding, its acceptance rules, and an embedded tiny model pair."""
from .engine import BlockSizePolicy, CycleRecord, FixedBlockSize, GenerationResult, generate
from .errors import DFlashError
from .loading import KNOWN_MODELS, load_draft, load_target, load_tokenizer
from .model import DFlashDraftModel, build_target_layer_ids, extract_context_feature, make_draft_config

__all__ = [
    "BlockSizePolicy", "CycleRecord", "DFlashDraftModel", "DFlashError", "FixedBlockSize", "GenerationResult",
    "KNOWN_MODELS", "build_target_layer_ids", "extract_context_feature", "generate", "load_draft", "load_target",
    "load_tokenizer", "make_draft_config",
]
