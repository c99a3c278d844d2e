"""The decode engine: the protocol (protocol.py), its loop (loop.py), the default plug-ins (drafter.py,
verifiers.py, acceptors.py), the pure acceptance rules (acceptance.py), block-size policies and KV-cache helpers.
A new idea is a set of plug-ins in dflash.variants; nothing here changes for it."""
from .acceptors import ChainSamplingAcceptor, GreedyAcceptor, TreeSamplingAcceptor, default_acceptor
from .checks import check_block_size, check_pair, check_prompt, check_temperature, left_pad
from .drafter import DFlashDrafter, one_hot_law, probability_margins
from .loop import commit_tokens, cpu_seconds, generate, protocol_costs
from .protocol import (Acceptor, BlockSizePolicy, CycleOutcome, CycleRecord, Drafter, FixedBlockSize,
                       GenerationResult, Proposal, Verification, Verifier)
from .verifiers import LinearVerifier, TreeVerifier

__all__ = ["Acceptor", "BlockSizePolicy", "ChainSamplingAcceptor", "CycleOutcome", "CycleRecord", "DFlashDrafter",
           "Drafter", "FixedBlockSize", "GenerationResult", "GreedyAcceptor", "LinearVerifier", "Proposal",
           "TreeSamplingAcceptor", "TreeVerifier", "Verification", "Verifier", "check_block_size", "check_pair",
           "check_prompt", "check_temperature", "commit_tokens", "cpu_seconds", "default_acceptor", "generate",
           "left_pad", "one_hot_law", "probability_margins", "protocol_costs"]
