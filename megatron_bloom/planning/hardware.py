"""What the planner assumes about one accelerator and its links. Every number is printed with a plan.

Peak FLOPs are dense tensor-core rates for 16-bit inputs (fp32 runs at the TF32 rate, half of
that); bandwidths are per GPU and per direction, what a ring collective can use:

    intra-node   NVLink (A100: 12 links x 25 GB/s = 300 GB/s; H100/H200: 18 x 25 = 450 GB/s)
    inter-node   one NIC per GPU (A100: 200 Gb/s HDR = 25 GB/s; H100/H200: 400 Gb/s NDR = 50 GB/s)

BLOOM-176B's Jean Zay nodes had 4 x 100 Gb/s Omni-Path per 8 GPUs (~6 GB/s per GPU); pass
``--inter-node-gbps 6.25`` to plan for that network.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Dict, Optional

GIB = 1024**3


@dataclass(frozen=True)
class Accelerator:
    name: str
    """Short name used on the command line (a100-80g)."""
    memory_gib: float
    """Device memory in GiB (2**30 bytes)."""
    peak_tflops_16bit: float
    """Dense bf16/fp16 tensor-core peak in TFLOPs."""
    intra_node_gbps: float
    """GB/s per GPU per direction inside a node (NVLink)."""
    inter_node_gbps: float
    """GB/s per GPU per direction between nodes (InfiniBand / Omni-Path)."""
    supports_bf16: bool = True
    """V100 has no bf16 units."""
    dropout_mask_in_input_dtype: bool = False
    """torch keeps a dropout mask as 1-byte bools on GPUs and in the input's dtype on CPUs."""

    def peak_tflops(self, precision: str) -> float:
        return self.peak_tflops_16bit if precision in ("bf16", "fp16") else self.peak_tflops_16bit / 2

    @property
    def memory_bytes(self) -> float:
        return self.memory_gib * GIB


def _cpu() -> Accelerator:
    """A CPU 'device' for planning the CPU/gloo test runs: all RAM of this machine."""
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB
    except (ValueError, OSError, AttributeError):
        ram = 16.0
    return Accelerator("cpu", ram, 0.1, 5.0, 5.0, dropout_mask_in_input_dtype=True)


ACCELERATORS: Dict[str, Accelerator] = {
    "a100-40g": Accelerator("a100-40g", 40, 312, 300, 25),
    "a100-80g": Accelerator("a100-80g", 80, 312, 300, 25),
    "h100-80g": Accelerator("h100-80g", 80, 989, 450, 50),
    "h200": Accelerator("h200", 141e9 / GIB, 989, 450, 50),
    "v100-16g": Accelerator("v100-16g", 16, 125, 150, 12.5, supports_bf16=False),
    "v100-32g": Accelerator("v100-32g", 32, 125, 150, 12.5, supports_bf16=False),
}
"""Known GPU kinds; ``cpu`` is added on demand (its memory is this machine's RAM)."""


def accelerator(name: str, memory_gib: Optional[float] = None, intra_node_gbps: Optional[float] = None,
                inter_node_gbps: Optional[float] = None) -> Accelerator:
    """The named accelerator with optional overrides; KeyError names the known kinds."""
    if name == "cpu":
        acc = _cpu()
    elif name in ACCELERATORS:
        acc = ACCELERATORS[name]
    else:
        raise KeyError(f"unknown --gpu '{name}'; known: {', '.join([*ACCELERATORS, 'cpu'])}")
    changes = {k: v for k, v in (("memory_gib", memory_gib), ("intra_node_gbps", intra_node_gbps),
                                 ("inter_node_gbps", inter_node_gbps)) if v is not None}
    return replace(acc, **changes) if changes else acc
