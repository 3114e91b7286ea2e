"""fp16 on a CPU without native oneDNN fp16 kernels (e.g. AMD EPYC): DeepSpeed's CPU accelerator would refuse it."""
import torch
from deepspeed.accelerator import get_accelerator

from megatron_bloom.training.engine import allow_fp16_on_any_cpu


def test_fp16_is_allowed_on_a_cpu_without_native_fp16(monkeypatch):
    accelerator = get_accelerator()
    assert accelerator.device_name() == "cpu"
    # As DeepSpeed reports it on such a CPU: fp16 missing from what its gradient reduction accepts.
    monkeypatch.setattr(accelerator, "is_fp16_supported", lambda: False)
    assert torch.float16 not in accelerator.supported_dtypes()
    allow_fp16_on_any_cpu()
    assert accelerator.is_fp16_supported()
    assert torch.float16 in accelerator.supported_dtypes()
