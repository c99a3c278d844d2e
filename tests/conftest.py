"""Tests use tiny models: one thread per process avoids oversubscribing the cores under pytest-xdist."""
import torch

torch.set_num_threads(1)
