"""Ablations run one thread per process: cases are tiny-model decodes, and under pytest-xdist two workers
share two cores; oversubscribed threads would make timings noise."""
import torch

torch.set_num_threads(1)
