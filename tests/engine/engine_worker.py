"""Training run used by the engine parity tests (imported by spawned ranks)."""
import torch
import torch.distributed as dist

from megatron_bloom.config import RunConfig, validate_config
from megatron_bloom.config.schema import ModelConfig
from megatron_bloom.distributed import init_distributed

SEQ = 32
VOCAB = 250


def tiny_config(tp, pp, zero, mbs=2, gbs=8, clip=0.5, model=None, parallel=None, **training):
    cfg = RunConfig()
    cfg.model = ModelConfig(num_layers=4, hidden_size=48, num_attention_heads=4, vocab_size=VOCAB,
                            seq_length=SEQ, init_method_std=0.05,
                            # Layouts are compared step for step: each layout draws other dropout masks.
                            hidden_dropout=0.0, attention_dropout=0.0)
    cfg.parallel.tensor_model_parallel_size = tp
    cfg.parallel.pipeline_model_parallel_size = pp
    cfg.parallel.zero_stage = zero
    cfg.training.micro_batch_size = mbs
    cfg.training.global_batch_size = gbs
    cfg.training.clip_grad = clip
    cfg.training.lr = 3e-3
    cfg.training.weight_decay = 0.1
    cfg.training.train_iters = 100
    cfg.training.seed = 42
    for section, values in (("training", training), ("model", model or {}), ("parallel", parallel or {})):
        for k, v in values.items():
            setattr(getattr(cfg, section), k, v)
    return cfg


def sample(k):
    g = torch.Generator().manual_seed(1000 + k)
    # A learnable stream: runs of a repeated token pattern plus noise, so the loss falls.
    base = torch.arange(SEQ + 1) % 7 + (k % 5) * 11
    noise = torch.randint(0, VOCAB, (SEQ + 1,), generator=g)
    keep = torch.rand(SEQ + 1, generator=g) < 0.8
    return torch.where(keep, base, noise)


def micro_batches(step, gbs, mbs, dp, dp_rank):
    """Megatron order: micro-batch j of DP rank r holds samples base + j*mbs*dp + r*mbs + [0, mbs)."""
    out = []
    for j in range(gbs // (mbs * dp)):
        start = step * gbs + j * mbs * dp + dp_rank * mbs
        tokens = torch.stack([sample(k) for k in range(start, start + mbs)])
        out.append((tokens[:, :-1], (tokens[:, 1:], torch.ones(mbs, SEQ))))
    return out


def _build_and_train(tp, pp, zero, steps, **kw):
    from megatron_bloom.training.engine import BloomEngine

    cfg = tiny_config(tp, pp, zero, **kw)
    validate_config(cfg, dist.get_world_size())
    state = init_distributed(tp, pp, backend="gloo")
    engine = BloomEngine(cfg, state)
    t = cfg.training
    results = []
    for step in range(steps):
        batches = micro_batches(step, t.global_batch_size, t.micro_batch_size, state.dims.dp, state.dp_rank)
        r = engine.train_step(batches if engine.reads_data else [])
        results.append((r.loss, r.grad_norm, r.skipped))
    return engine, state, results


def train(tp, pp, zero, steps, **kw):
    return _build_and_train(tp, pp, zero, steps, **kw)[2]


def train_without_owner_marks(tp, pp, zero, steps, **kw):
    """DeepSpeed's own grad-norm bookkeeping, for comparison with ours (see the engine notes)."""
    import megatron_bloom.training.engine as engine_mod

    engine_mod.mark_grad_norm_owners = lambda module, tp_rank: None
    return train(tp, pp, zero, steps, **kw)


def train_and_check_replicas(tp, pp, zero, steps, **kw):
    """Train, then report whether tied embedding copies and TP-replicated parameters are bitwise equal."""
    engine, state, results = _build_and_train(tp, pp, zero, steps, **kw)

    def all_equal(tensor, group, ranks):
        parts = [torch.empty_like(tensor) for _ in ranks]
        dist.all_gather(parts, tensor.contiguous(), group=group)
        return all(torch.equal(p, parts[0]) for p in parts)

    from megatron_bloom.models.bloom.pipeline import EmbeddingPipe

    checks = {}
    # Collective calls must match on every rank of a group: iterate in a fixed order everywhere.
    if state.dims.pp > 1:
        emb = [m for m in engine.module.modules() if isinstance(m, EmbeddingPipe)]
        weight = emb[0].word_embeddings.weight.detach() if emb else None
        if state.is_first_stage or state.is_last_stage:
            checks["tied"] = all_equal(weight, state.embedding_group, state.embedding_ranks)
    if state.dims.tp > 1:
        replicated = [p.detach() for p in engine.module.parameters() if not getattr(p, "tp_sharded", False)]
        checks["tp_replicas"] = all(all_equal(p, state.tp_group, state.tp_ranks) for p in replicated)
    return results, checks
