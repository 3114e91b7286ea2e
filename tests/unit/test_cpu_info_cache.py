"""DeepSpeed's op builders ask py-cpuinfo at every op load; the engine makes that one question per process."""
import cpuinfo
import pytest

from megatron_bloom.training.deepspeed_glue import cache_cpu_info


@pytest.fixture
def counted(monkeypatch):
    """py-cpuinfo's answer replaced by a counted stand-in (the real one takes over a second)."""
    calls = []

    def get_cpu_info():
        calls.append(1)
        return {"arch": "X86_64", "flags": ["avx2", "fma"]}

    monkeypatch.setattr(cpuinfo, "get_cpu_info", get_cpu_info)
    return calls


def test_cpu_info_is_asked_once_and_each_caller_gets_its_own_copy(counted):
    cache_cpu_info()
    cache_cpu_info()  # installing twice wraps once
    first = cpuinfo.get_cpu_info()
    first["flags"].append("changed by a caller")
    from cpuinfo import get_cpu_info  # as DeepSpeed's builders import it, at call time

    assert get_cpu_info() == {"arch": "X86_64", "flags": ["avx2", "fma"]}
    assert len(counted) == 1


def test_deepspeed_builders_flags_come_from_the_one_answer(counted):
    from deepspeed.accelerator import get_accelerator

    cache_cpu_info()
    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    assert (builder.cpu_arch(), builder.simd_width()) == ("-march=native", "-D__AVX256__")
    assert (builder.cpu_arch(), builder.simd_width()) == ("-march=native", "-D__AVX256__")
    assert len(counted) == 1
