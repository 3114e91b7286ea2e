"""What DeepSpeed needs from us beyond its JSON config: the model wrappers and the flags it reads.

* ``build_pipeline_module``: the layer specs under DeepSpeed's ``PipelineModule`` (any PP, ZeRO 0/1).
* ``BloomSequential``: the same specs on one stage, built as ``PipelineModule`` builds them, for
  DeepSpeed's plain engine (PP = 1, ZeRO 2/3).
* ``mark_grad_norm_owners``: the per-parameter flags DeepSpeed's gradient norm reads.
* ``allow_fp16_on_any_cpu``: DeepSpeed's CPU accelerator refusing fp16 where torch computes it.
* ``cache_cpu_info``: py-cpuinfo asked once per process instead of at every op load.

Every spec is built right after seeding the RNGs with ``base_seed + idx`` (DeepSpeed's
``seed_layers``), so both wrappers start from the same weights.
"""
from __future__ import annotations

import copy
from typing import Any, Callable, List, Sequence

import torch
import torch.nn as nn

from megatron_bloom.config.schema import RunConfig
from megatron_bloom.layers.duplicated import is_tp_duplicated
from megatron_bloom.models.seeding import seed_layer

LossFn = Callable[[torch.Tensor, Sequence[torch.Tensor]], torch.Tensor]


def build_pipeline_module(specs: List[Any], loss_fn: LossFn, cfg: RunConfig) -> nn.Module:
    """DeepSpeed's ``PipelineModule`` over ``specs``, cut into ``cfg``'s PP stages."""
    from deepspeed.pipe import PipelineModule
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    p = cfg.parallel
    topology = PipeModelDataParallelTopology(num_pp=p.pipeline_model_parallel_size,
                                             num_mp=p.tensor_model_parallel_size, num_dp=p.data_parallel_size)
    module = PipelineModule(
        layers=specs,
        topology=topology,
        loss_fn=loss_fn,
        seed_layers=True,
        seed_fn=seed_layer,  # DeepSpeed passes numpy ints, which random.seed rejects
        base_seed=cfg.training.seed,
        partition_method=p.pp_partition_method,
    )
    # Seeds per layer while building only. Left on, DeepSpeed reseeds every forward from a
    # micro-batch counter that restarts at 0 in each process, so a resumed run would repeat
    # the first steps' dropout masks; dropout draws from the saved RNG streams instead.
    module.seed_layers = False
    return module


class BloomSequential(nn.Module):
    """All layer specs on one stage, built like PipelineModule builds them; forward returns the loss.

    Used when PP == 1 and ZeRO is 2 or 3, where DeepSpeed's plain engine replaces the pipeline engine.
    ``layers`` is keyed by the spec index, so parameter names (``layers.<idx>.<key>``) carry the
    pipeline layer numbers a PipelineModule's files have; specs that are plain functions hold none.
    """

    def __init__(self, specs: List[Any], loss_fn: LossFn, base_seed: int):
        super().__init__()
        from deepspeed.pipe import LayerSpec, TiedLayerSpec

        self.loss_fn = loss_fn
        self.layers = nn.ModuleDict()
        self.funcs: List[Any] = []
        tied = {}
        for idx, spec in enumerate(specs):
            seed_layer(base_seed + idx)  # for every spec, as PipelineModule does
            if isinstance(spec, TiedLayerSpec):
                if spec.key not in tied:
                    tied[spec.key] = spec.build()
                    self.layers[str(idx)] = tied[spec.key]
                module = tied[spec.key]
                self.funcs.append(module if spec.forward_fn is None else (lambda x, m=module, f=spec.forward_fn: f(m, x)))
            elif isinstance(spec, LayerSpec):
                module = spec.build()
                self.layers[str(idx)] = module
                self.funcs.append(module)
            else:
                self.funcs.append(spec)  # a function: no weights

    def logits(self, inputs: Any) -> torch.Tensor:
        x = inputs
        for f in self.funcs:
            x = f(x)
        return x

    def forward(self, inputs: Any, labels: Sequence[torch.Tensor]) -> torch.Tensor:
        return self.loss_fn(self.logits(inputs), labels)


def mark_grad_norm_owners(module: nn.Module, tp_rank: int) -> None:
    """Make every parameter count exactly once in DeepSpeed's global gradient norm.

    DeepSpeed counts a parameter when ``is_model_parallel_parameter(p)`` or when the rank is
    model-parallel rank 0, and skips ``ds_pipe_replicated`` ones in ZeRO. Left alone, the pipeline
    engine's ZeRO-0 path counts replicated parameters (LayerNorms, biases) of stages > 0 nowhere,
    and a tied embedding's second copy twice under TP. Here: a TP-sharded parameter is counted on
    its rank; a TP-replicated one on TP rank 0 only; a tied copy that is not the owner, never.
    """
    for p in module.parameters():
        sharded = not is_tp_duplicated(p)
        p.tp_sharded = sharded  # keeps "is this a shard" when the flags below say "not counted here"
        replicated_copy = bool(getattr(p, "ds_pipe_replicated", False))
        counted = not replicated_copy and (sharded or tp_rank == 0)
        p.model_parallel = counted
        p.tensor_model_parallel = counted


def allow_fp16_on_any_cpu() -> None:
    """Let DeepSpeed's CPU accelerator run fp16 on every CPU, as torch does.

    It reports fp16 as supported only where oneDNN has native fp16 kernels (AVX512-FP16 or AMX-FP16,
    which e.g. AMD EPYC lacks) and then refuses the engine ("Type fp16 is not supported on your
    device"); torch computes fp16 on any CPU, only more slowly without those instructions. (bf16 it
    always allows.) GPU accelerators are left as they are.
    """
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    if accelerator.device_name() == "cpu" and not accelerator.is_fp16_supported():
        # supported_dtypes(), which DeepSpeed's gradient reduction asserts against, asks the same method.
        accelerator.is_fp16_supported = lambda: True


def cache_cpu_info() -> None:
    """Ask py-cpuinfo once per process instead of at every DeepSpeed op load.

    DeepSpeed's op builders call ``cpuinfo.get_cpu_info()`` for their compiler flags each time they
    load an op, cached build or not: twice for the CPU comm op that every engine on CPU loads
    (``cpu_arch`` and ``simd_width``). Each call starts a Python subprocess that times the clock,
    about 1.3 s on a 2-core AMD EPYC, per rank. The CPU does not change while the process runs, so
    later calls get a copy of the first answer. Installed once; without py-cpuinfo, nothing to do.
    """
    try:
        import cpuinfo
    except ImportError:
        return
    original = cpuinfo.get_cpu_info
    if getattr(original, "asks_once", False):
        return
    answer: dict = {}

    def get_cpu_info() -> dict:
        if not answer:
            answer.update(original())
        return copy.deepcopy(answer)

    get_cpu_info.asks_once = True
    cpuinfo.get_cpu_info = get_cpu_info


def norm_of_no_gradients_is_zero() -> None:
    """Let DeepSpeed's bf16 optimizer take the gradient norm on a stage that owns no gradient of its own.

    A last pipeline stage that holds only the tied LM head (BLOOMZ-176B's 72nd stage) has one
    parameter, the embedding's pipe-replicated copy, which the norm skips; DeepSpeed's
    ``get_global_norm_of_tensors`` then stacks an empty list and fails before the all-reduce every
    other stage enters. A zero tensor in its place adds nothing to the sum (or the max) and keeps
    the collective. Installed once; other inputs pass through unchanged.
    """
    from deepspeed.accelerator import get_accelerator
    from deepspeed.runtime import bf16_optimizer

    original = bf16_optimizer.get_global_norm_of_tensors
    if getattr(original, "accepts_no_tensors", False):
        return

    def get_global_norm_of_tensors(input_tensors, *args, **kwargs):
        if not input_tensors:
            input_tensors = [torch.zeros(1, device=get_accelerator().current_device_name())]
        return original(input_tensors, *args, **kwargs)

    get_global_norm_of_tensors.accepts_no_tensors = True
    bf16_optimizer.get_global_norm_of_tensors = get_global_norm_of_tensors
