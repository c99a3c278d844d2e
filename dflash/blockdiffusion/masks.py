"""The block-wise attention of a block-diffusion LM (Fast-dLLM v2), as bool "may attend" matrices.

One rule, used by training and decoding alike: positions fall into blocks of `block_size` (position p is in
block p // block_size); a clean position attends to every position of its own block and of earlier blocks
(block-causal), so the K/V of a committed block never depend on what comes after it and a prefix cache is exact.
Training adds a noisy copy of the sequence: a noisy position attends bidirectionally within its own noisy
block and to the clean copy of earlier blocks. Masks are turned into additive float masks by
`dflash.engine.verifiers.additive_mask`.
"""
from __future__ import annotations

import torch


def block_ids(positions: torch.Tensor, block_size: int) -> torch.Tensor:
    return torch.div(positions, block_size, rounding_mode="floor")


def block_causal(query_positions: torch.Tensor, key_positions: torch.Tensor, block_size: int) -> torch.Tensor:
    """[Q, K] bool: query may attend to key iff the key's block is not after the query's block."""
    return block_ids(key_positions, block_size)[None, :] <= block_ids(query_positions, block_size)[:, None]


def training_mask(length: int, block_size: int) -> torch.Tensor:
    """[2L, 2L] bool over the concatenation (noisy stream 0..L-1, clean stream 0..L-1) of one sequence.

    noisy block b -> noisy block b (bidirectional) and clean blocks < b; clean block b -> clean blocks <= b.
    """
    positions = torch.arange(length)
    blocks = block_ids(positions, block_size)
    same_block = blocks[:, None] == blocks[None, :]
    earlier = blocks[None, :] < blocks[:, None]
    clean = blocks[None, :] <= blocks[:, None]
    nothing = torch.zeros(length, length, dtype=torch.bool)
    return torch.cat([torch.cat([same_block, earlier], 1), torch.cat([nothing, clean], 1)], 0)
