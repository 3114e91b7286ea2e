"""Count what a live engine holds, by kind, to check the planner's memory model against it.

Every tensor reachable from the DeepSpeed engine's module, its optimizer wrapper and the torch
optimizer is counted once per storage, at the moments a step peaks: at the end of each backward
pass (ZeRO-2/3 still hold their reduction bucket), when the pipeline's gradient reduction starts
(every gradient of the step exists) and when the optimizer step starts (the reduced gradients and
every optimizer state exist). Each kind's largest value over the last step is reported, and the
largest sum.

Kinds: ``weights`` (storages behind the module's parameters), ``gradients`` (``.grad`` and
every optimizer-wrapper tensor whose attribute path names a gradient), ``optimizer_states``
(torch optimizer state, and parameter copies the wrapper hands to it: fp32 masters), ``other``.

Activations are measured separately on one transformer block: the bytes of the tensors autograd
saves for backward in one micro-batch (``saved_tensors_hooks``), deduplicated by storage.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Dict, List

import torch
import torch.nn as nn

from megatron_bloom.config.schema import RunConfig

KINDS = ("weights", "gradients", "optimizer_states", "other")


@dataclass
class MeasuredMemory:
    rank: int
    parameters: int
    """Parameters on this rank (the tied embedding once per stage that holds it)."""
    bytes: Dict[str, int] = field(default_factory=dict)
    """Largest bytes of each kind over the snapshots of the last step."""
    peak_total: int = 0
    """Largest sum over the snapshots of the last step (kinds need not peak together)."""
    largest_other: List[str] = field(default_factory=list)
    """The biggest uncategorised tensors, to explain ``other``."""

    def to_dict(self) -> dict:
        return asdict(self)


class _Census:
    def __init__(self) -> None:
        self.kind_of: Dict[int, str] = {}
        self.size_of: Dict[int, int] = {}
        self.where: Dict[int, str] = {}
        self._visited: set = set()

    def add(self, t: torch.Tensor, kind: str, path: str) -> None:
        if t.device.type == "meta":
            return
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key == 0 or key in self.kind_of:
            return
        self.kind_of[key], self.size_of[key], self.where[key] = kind, storage.nbytes(), path

    def walk(self, obj, path: str, depth: int = 0) -> None:
        """Tensors inside DeepSpeed/torch optimizer objects, lists and dicts (not modules)."""
        if isinstance(obj, torch.Tensor):
            lowered = path.lower()
            if "ipg_bucket" in path:
                kind = "other"
            elif ".state[" in path:
                kind = "optimizer_states"
            elif "grad" in lowered:
                kind = "gradients"
            else:
                kind = "optimizer_states" if "fp32" in lowered else "other"
            self.add(obj, kind, path)
            return
        if depth > 8 or id(obj) in self._visited or isinstance(obj, (nn.Module, str, bytes, int, float)):
            return
        self._visited.add(id(obj))
        if isinstance(obj, dict):
            for k, v in obj.items():
                self.walk(v, f"{path}[{k if isinstance(k, (str, int)) else type(k).__name__}]", depth + 1)
        elif isinstance(obj, (list, tuple)):
            for i, v in enumerate(obj):
                self.walk(v, f"{path}[{i}]", depth + 1)
        elif type(obj).__module__.startswith(("deepspeed", "torch.optim")) and hasattr(obj, "__dict__"):
            for k, v in vars(obj).items():
                self.walk(v, f"{path}.{k}", depth + 1)

    def totals(self) -> Dict[str, int]:
        out = {k: 0 for k in KINDS}
        for key, kind in self.kind_of.items():
            out[kind] += self.size_of[key]
        return out


def census(ds_engine) -> _Census:
    """One snapshot. Order matters, the first claim of a storage wins: ``.grad`` tensors that are
    views into ZeRO's reduction bucket count as the bucket (``other``), not as gradients."""
    c = _Census()
    module = ds_engine.module
    for name, p in module.named_parameters():
        if hasattr(p, "ds_tensor"):  # ZeRO-3: the module keeps an empty placeholder, this is the shard
            c.add(p.ds_tensor, "weights", name + ".ds_tensor")
        c.add(p, "weights", name)
    wrapper = ds_engine.optimizer
    basic = getattr(wrapper, "optimizer", wrapper)
    for group in basic.param_groups:
        for p in group["params"]:
            c.add(p, "optimizer_states", "param_groups (master copy)")
            for v in basic.state.get(p, {}).values():
                if isinstance(v, torch.Tensor):
                    c.add(v, "optimizer_states", "optimizer.state")
    c.walk(wrapper, "optimizer")
    for name, p in module.named_parameters():
        if p.grad is not None:
            c.add(p.grad, "gradients", name + ".grad")
    return c


def measure_engine(cfg: RunConfig, steps: int = 3) -> MeasuredMemory:
    """Build the engine for ``cfg`` in this process group, train ``steps`` random steps, count.

    ``cfg`` must be validated (data_parallel_size and global_batch_size set). Collective: every
    rank of the job calls it.
    """
    import torch.distributed as dist

    from megatron_bloom.distributed import init_distributed, set_seed
    from megatron_bloom.training.engine import BloomEngine

    p = cfg.parallel
    state = init_distributed(p.tensor_model_parallel_size, p.pipeline_model_parallel_size,
                             backend=p.distributed_backend or "gloo")
    set_seed(cfg.training.seed)
    engine = BloomEngine(cfg, state)
    ds = engine.engine
    snapshots: List[_Census] = []

    def snap() -> None:
        snapshots.append(census(ds))

    # Wrap the optimizer step (both engines) and the pipeline's gradient reduction.
    wrapper = ds.optimizer
    original_step = wrapper.step

    def step(*args, **kwargs):
        snap()
        return original_step(*args, **kwargs)

    wrapper.step = step
    # ZeRO-2/3 allocate their reduction bucket during backward and free it after: look at the end
    # of backward too, while it still exists.
    epilogue = getattr(wrapper, "independent_gradient_partition_epilogue", None)
    if epilogue is not None:
        def epilogue_and_snap(*args, **kwargs):
            snap()
            return epilogue(*args, **kwargs)

        wrapper.independent_gradient_partition_epilogue = epilogue_and_snap
    if engine.is_pipeline:
        from deepspeed.runtime.pipe import schedule

        table = dict(type(ds)._INSTRUCTION_MAP)
        reduce = table[schedule.ReduceGrads]

        def reduce_and_snap(self, *args, **kwargs):
            snap()
            return reduce(self, *args, **kwargs)

        table[schedule.ReduceGrads] = reduce_and_snap
        ds._INSTRUCTION_MAP = table

    m, t = cfg.model, cfg.training
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        batches = []
        if engine.reads_data:
            for _ in range(engine.gradient_accumulation_steps):
                ids = torch.randint(0, m.vocab_size, (t.micro_batch_size, m.seq_length), generator=gen)
                labels = torch.randint(0, m.vocab_size, (t.micro_batch_size, m.seq_length), generator=gen)
                batches.append((ids, (labels, torch.ones(labels.shape))))
        engine.train_step(batches)
    # The last step's snapshots (optimizer states exist from the first step on); each step takes
    # one per micro-batch at the end of backward (ZeRO-2/3), one at reduction and one at the step.
    last = snapshots[-(len(snapshots) // steps):]
    totals = [c.totals() for c in last]
    best = last[max(range(len(last)), key=lambda i: sum(totals[i].values()))]
    others = sorted(((best.size_of[k], best.where[k]) for k, kind in best.kind_of.items() if kind == "other"),
                    reverse=True)[:5]
    # ZeRO-3 leaves empty placeholders in the module; ds_numel is the parameter's real size.
    params = sum(getattr(q, "ds_numel", q.numel()) for q in ds.module.parameters())
    return MeasuredMemory(dist.get_rank(), params, {k: max(t[k] for t in totals) for k in KINDS},
                          max(sum(t.values()) for t in totals), [f"{w} ({n} B)" for n, w in others])


def saved_activation_bytes(cfg: RunConfig, dtype: torch.dtype) -> int:
    """Bytes autograd saves for backward in one BLOOM block for one micro-batch (TP = 1)."""
    from megatron_bloom.models.spec import get_model_spec

    block = get_model_spec().build_block(cfg.model, 0).to(dtype)
    block.recompute = False
    x = torch.randn(cfg.training.micro_batch_size, cfg.model.seq_length, cfg.model.hidden_size,
                    dtype=dtype, requires_grad=True)
    seen: Dict[int, int] = {}

    def pack(t: torch.Tensor):
        if isinstance(t, nn.Parameter) or t.device.type == "meta":
            return t
        storage = t.untyped_storage()
        if storage.data_ptr() not in seen and t is not x:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = block(x)
    # Parameters saved for backward are weights, not activations; drop any that slipped in.
    for q in block.parameters():
        seen.pop(q.untyped_storage().data_ptr(), None)
    del out
    # The block input is kept by the previous layer's output; count it once, as the formula does.
    return sum(seen.values()) + x.numel() * x.element_size()
