"""Engine runs with dropout on, for tests/engine/test_dropout_engine.py (imported by spawned ranks)."""
import torch
import torch.distributed as dist
import torch.nn as nn

from engine_worker import _build_and_train, micro_batches, tiny_config

DROPOUT = {"hidden_dropout": 0.1, "attention_dropout": 0.1}


def curve(tp, pp, recompute, steps):
    """(loss, grad norm, skipped) per step with Megatron's default dropout, recompute on or off."""
    model = dict(DROPOUT, checkpoint_activations=recompute)
    return _build_and_train(tp, pp, 1, steps, model=model)[2]


def first_masks(tp, pp):
    """Each dropout module's mask in the first micro-batch of one step, eager attention.

    Mask values: 0 where the input was already 0 (masked attention), 1 kept, 2 dropped.

    Returns (tp rank, pp rank, {module name: mask}) for this rank.
    """
    from megatron_bloom.training.engine import BloomEngine
    from megatron_bloom.distributed import init_distributed
    from megatron_bloom.config import validate_config

    cfg = tiny_config(tp, pp, 1, model={"hidden_dropout": 0.5, "attention_dropout": 0.5, "attention_impl": "eager"})
    validate_config(cfg, dist.get_world_size())
    state = init_distributed(tp, pp, backend="gloo")
    engine = BloomEngine(cfg, state)
    masks = {}

    def record(name):
        def hook(module, inputs, output):
            if module.training and name not in masks:
                nonzero = inputs[0] != 0
                masks[name] = nonzero.to(torch.int8) + (nonzero & (output == 0)).to(torch.int8)
        return hook

    for name, module in engine.module.named_modules():
        if isinstance(module, nn.Dropout):
            module.register_forward_hook(record(name))
    t = cfg.training
    batches = micro_batches(0, t.global_batch_size, t.micro_batch_size, state.dims.dp, state.dp_rank)
    engine.train_step(batches if engine.reads_data else [])
    # numpy: tensors would cross the result queue as shared memory that dies with this process.
    return state.tp_rank, state.pp_rank, {k: v.numpy() for k, v in masks.items()}


def duplicated_copies_equal_after_drift(sync, steps=2):
    """TP=2: put a drift into rank 1's copy of every duplicated parameter, train; are the copies equal again?"""
    engine, state, _ = _build_and_train(2, 1, 0, 0, parallel={"sync_tp_duplicated_parameters": sync}, clip=0.0)
    from megatron_bloom.layers.duplicated import is_tp_duplicated

    duplicated = [p for p in engine.module.parameters() if is_tp_duplicated(p)]
    assert duplicated
    if state.tp_rank == 1:
        with torch.no_grad():
            for p in duplicated:
                p.add_(1e-3)
    t = engine.cfg.training
    for step in range(steps):
        engine.train_step(micro_batches(step, t.global_batch_size, t.micro_batch_size, 1, 0))
    equal = []
    for p in duplicated:
        parts = [torch.empty_like(p) for _ in range(2)]
        dist.all_gather(parts, p.detach().contiguous(), group=state.tp_group)
        equal.append(torch.equal(parts[0], parts[1]))
    return all(equal), len(equal)
