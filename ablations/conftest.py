"""Ablations run one thread per process: cases are tiny-model decodes, and under pytest-xdist two workers
share two cores; oversubscribed threads would make timings noise. Each family's fixture comes from its
FamilySpec (dflash.harness.family), registered through dflash.plugin."""
import torch

torch.set_num_threads(1)
