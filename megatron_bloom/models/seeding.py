"""Seeding before building one layer, shared by every model family and the training engine."""
from __future__ import annotations


def seed_layer(seed: int) -> None:
    """Seed python, numpy and torch before building one layer (what DeepSpeed's ``seed_layers``
    does with ``base_seed + layer index``); ``int`` because DeepSpeed passes numpy integers."""
    import random

    import numpy as np
    import torch

    seed = int(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
