"""bf16/fp16 on CPUs without oneDNN's half-precision kernels (e.g. AMD EPYC with AVX2 only)."""
import importlib
import os
import sys
import time

import pytest
import torch
from deepspeed.accelerator import get_accelerator

from megatron_bloom.training import engine
from megatron_bloom.training.engine import (
    allow_fp16_on_any_cpu,
    emulated_cpu_half_precision,
    half_precision_warning,
)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_fp16_is_allowed_on_a_cpu_without_native_fp16(monkeypatch):
    accelerator = get_accelerator()
    assert accelerator.device_name() == "cpu"
    # As DeepSpeed reports it on such a CPU: fp16 missing from what its gradient reduction accepts.
    monkeypatch.setattr(accelerator, "is_fp16_supported", lambda: False)
    assert torch.float16 not in accelerator.supported_dtypes()
    allow_fp16_on_any_cpu()
    assert accelerator.is_fp16_supported()
    assert torch.float16 in accelerator.supported_dtypes()


def best_seconds(a, b, repeats=3):
    a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return best


@pytest.mark.parametrize("precision, dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_emulation_is_detected_as_this_cpu_computes(precision, dtype):
    # Emulated matmuls ran 30-100x slower than fp32 (AMD EPYC, AVX2); native ones are within ~2x of it or
    # faster. One thread: with two, a busy second core stalls small fp32 matmuls at the thread barrier.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        a, b = torch.randn(512, 512), torch.randn(512, 512)
        ratio = best_seconds(a.to(dtype), b.to(dtype)) / best_seconds(a, b)
    finally:
        torch.set_num_threads(threads)
    assert emulated_cpu_half_precision(precision) == (ratio > 5), f"{precision} / fp32 matmul time: {ratio:.1f}x"


def test_the_warning_names_the_precision_only_on_an_emulating_cpu(monkeypatch):
    assert not emulated_cpu_half_precision("fp32")
    monkeypatch.setattr(engine, "emulated_cpu_half_precision", lambda precision: precision == "bf16")
    line = half_precision_warning("bf16", torch.device("cpu"))
    assert line.startswith("WARNING: this CPU has no native bf16 matmul kernels") and "drop --bf16" in line
    assert half_precision_warning("fp16", torch.device("cpu")) is None
    assert half_precision_warning("bf16", torch.device("cuda", 0)) is None


def test_bf16_step_benchmark_refuses_an_emulating_cpu_before_building_models(monkeypatch, capsys):
    monkeypatch.syspath_prepend(REPO)
    model_step = importlib.import_module("benchmarks.model_step")
    monkeypatch.setattr(model_step, "emulated_cpu_half_precision", lambda precision: True)
    monkeypatch.setattr(model_step, "build_models", lambda args: pytest.fail("built the models"))
    with pytest.raises(SystemExit) as stop:
        model_step.main(["--dtype", "bf16"])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --dtype bf16: this CPU has no native bf16 matmul kernels")
    assert "use --dtype fp32" in err[0]
