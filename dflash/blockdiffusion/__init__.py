"""Fast-dLLM v2: block-diffusion LM decoding (threshold unmasking, prefix and dual caches, layer reuse)."""
from .decode import CACHES, DecodeOutput, generate
from .reuse import LayerReuse

__all__ = ["CACHES", "DecodeOutput", "LayerReuse", "generate"]
