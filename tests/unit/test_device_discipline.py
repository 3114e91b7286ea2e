"""GPU-path habits checked on CPU: no host sync per micro-batch in the loss meters, one merged layer
held at a time by ``load_weights_only``, accelerator memory in the memory line."""
import contextlib
import weakref

import pytest
import torch

from megatron_bloom.monitoring.group_loss import GroupLossMeter


@contextlib.contextmanager
def host_syncs_refused():
    """Any copy to the host or read of a tensor's value raises: what a CUDA sync would cost."""
    def refuse(name):
        def method(*args, **kwargs):
            raise AssertionError(f"host sync: Tensor.{name}")
        return method

    saved = {name: getattr(torch.Tensor, name) for name in ("cpu", "item", "tolist", "numpy", "__bool__", "__int__",
                                                             "__float__")}
    try:
        for name in saved:
            setattr(torch.Tensor, name, refuse(name))
        yield
    finally:
        for name, method in saved.items():
            setattr(torch.Tensor, name, method)


def test_group_loss_meter_adds_without_a_host_sync():
    meter = GroupLossMeter([3, 2])
    losses = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    weights = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.5, 1.0]])
    languages = torch.tensor([[0, 0, 2], [1, 1, 1]])
    tasks = torch.tensor([[1, 1, 1], [0, 0, 0]])
    with host_syncs_refused():
        meter.add(losses, weights, [languages, tasks])
        meter.add(losses, weights, [languages, tasks])
    languages_mean, tasks_mean = meter.reduce(contributes=True)
    assert languages_mean == pytest.approx({0: 1.5, 1: (4 + 2.5 + 6) / 2.5})  # language 2 has no weight
    assert tasks_mean == pytest.approx({1: 1.5, 0: (4 + 2.5 + 6) / 2.5})
    assert meter.reduce(contributes=True) == [{}, {}]  # reset after each reduce


def test_memory_line_carries_the_accelerators_peaks(monkeypatch):
    from megatron_bloom.monitoring.metrics import device_memory_mb

    assert device_memory_mb(torch.device("cpu")) == {}
    asked = []
    monkeypatch.setattr(torch.accelerator, "max_memory_allocated", lambda d: asked.append(("alloc", d)) or 3 * 2**20)
    monkeypatch.setattr(torch.accelerator, "max_memory_reserved", lambda d: asked.append(("res", d)) or 5 * 2**20)
    gpu = torch.device("cuda", 1)
    assert device_memory_mb(gpu) == {"max allocated MB": 3.0, "max reserved MB": 5.0}
    assert asked == [("alloc", gpu), ("res", gpu)]


def test_load_weights_only_holds_one_merged_layer_at_a_time(tmp_path, monkeypatch):
    """At BLOOM-176B a merged block is ~7 GB: keeping every one until the end needed ~37 GB per rank."""
    from megatron_bloom.checkpoint import native
    from megatron_bloom.config.schema import ModelConfig

    cfg = ModelConfig(num_layers=3, hidden_size=16, num_attention_heads=2, vocab_size=40, seq_length=8)
    shapes = native.expected_shapes(cfg)
    native.write_native_checkpoint({k: torch.randn(s) for k, s in shapes.items()}, cfg, str(tmp_path / "ckpt"), 1)

    class Probe(dict):
        """A merged layer whose lifetime is watched."""

    alive = []
    read_layer = native.read_layer

    def watched(*args, **kwargs):
        held = sum(ref() is not None for ref in alive)
        assert held == 0, f"{held} merged layer(s) still held when the next is read"
        layer = Probe(read_layer(*args, **kwargs))
        alive.append(weakref.ref(layer))
        return layer

    monkeypatch.setattr(native, "read_layer", watched)
    from megatron_bloom.models.spec import get_model_spec
    from megatron_bloom.training.deepspeed_glue import BloomSequential

    class Engine:  # what load_weights_only uses of a BloomEngine: TP=1 PP=1 without DeepSpeed
        module = BloomSequential(get_model_spec().layer_specs(cfg, 40), None, 0)
        is_pipeline, padded_vocab_size = False, 40
        engine = type("DeepSpeedEngine", (), {"optimizer": None})()
        state = type("State", (), {"dims": type("Dims", (), {"tp": 1})(), "tp_rank": 0})()

    Engine.cfg = type("RunConfig", (), {"model": cfg})()
    native.load_weights_only(Engine(), str(tmp_path / "ckpt"), "global_step0")
    assert len(alive) == cfg.num_layers + 2  # embedding, blocks, final norm: each read once


@pytest.mark.parametrize("backend, expected", [("nccl", torch.device("cuda", 3)), ("gloo", None)])
def test_the_default_group_is_bound_to_the_ranks_device(monkeypatch, backend, expected):
    """On GPU, init_process_group gets device_id (the communicator starts eagerly on this rank's
    device and the groups split from it); gloo takes none."""
    import os

    from megatron_bloom.distributed import init
    from megatron_bloom.distributed.launch_env import LaunchEnv

    class Stop(Exception):
        pass

    seen = {}

    def init_process_group(**kwargs):
        seen.update(kwargs)
        raise Stop

    current = []
    monkeypatch.setattr(init.torch.accelerator, "set_device_index", current.append)
    monkeypatch.setattr(init.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(init.dist, "init_process_group", init_process_group)
    saved = dict(os.environ)
    try:
        with pytest.raises(Stop):
            init.init_distributed(1, 1, backend=backend, launch=LaunchEnv(3, 8, 3, "127.0.0.1", 1, "torchrun"))
    finally:
        os.environ.clear()
        os.environ.update(saved)
    assert seen["device_id"] == expected and seen["backend"] == backend
    assert current == ([3] if expected is not None else [])
