"""Finetuning steps on packed rows through BloomEngine, run by the loss/isolation tests (spawned ranks)."""
import numpy as np
import torch
import torch.distributed as dist

from megatron_bloom.config import RunConfig, validate_config
from megatron_bloom.config.schema import ModelConfig
from megatron_bloom.data.packing import PackedRows
from megatron_bloom.data.xp3 import PairedDataset, PairedDatasetWriter
from megatron_bloom.distributed import init_distributed

SEQ = 32
VOCAB = 200
EOD = 2
GBS = 8


def write_pairs(prefix: str, n: int = 48, seed: int = 0, eod_inside: bool = False) -> None:
    """Random pairs of varied lengths (a few longer than a row), two languages, three tasks.

    ``eod_inside``: also EOD where --eod-mask-loss changes the loss: every 4th pair's input ends
    with EOD (from pair 1 on) and every 4th target holds one before its final EOD (from pair 2 on).
    """
    rng = np.random.RandomState(seed)
    writer = PairedDatasetWriter(prefix, np.uint16, {"eod_id": EOD, "pad_id": 3})
    inputs, targets, langs, tasks = [], [], [], []
    for i in range(n):
        n_in = int(rng.randint(1, 20)) if i % 10 else SEQ + 5  # every 10th pair is overlong
        n_tg = int(rng.randint(1, 8))
        inputs.append(rng.randint(4, VOCAB, size=n_in))
        targets.append(np.append(rng.randint(4, VOCAB, size=n_tg), EOD))
        if eod_inside and i % 4 == 1:
            inputs[-1][-1] = EOD
        if eod_inside and i % 4 == 2:
            targets[-1][n_tg // 2] = EOD
        langs.append(["en", "fr"][i % 2])
        tasks.append(["qa", "sum", "trans"][i % 3])
    writer.add_pairs(inputs, targets, langs, tasks, [""] * n)
    writer.commit()


def tiny_config(tp, pp, zero, mbs):
    cfg = RunConfig()
    cfg.model = ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=VOCAB, seq_length=SEQ,
                            init_method_std=0.05,
                            hidden_dropout=0.0, attention_dropout=0.0)  # layouts compared step for step
    cfg.parallel.tensor_model_parallel_size = tp
    cfg.parallel.pipeline_model_parallel_size = pp
    cfg.parallel.zero_stage = zero
    t = cfg.training
    t.micro_batch_size, t.global_batch_size, t.train_iters = mbs, GBS, 10
    t.lr, t.clip_grad, t.weight_decay, t.seed = 1e-3, 1.0, 1e-4, 11
    return cfg


def _logits_pp1(engine, tokens, segment_ids):
    """Full logits [b, s, v] through the engine's own layer functions (one stage)."""
    module = engine.module
    funcs = module.funcs if hasattr(module, "funcs") else module.forward_funcs
    x = (tokens, segment_ids)
    for f in funcs:
        x = f(x)
    return x


def _changed_copy(tokens, segment_ids, row, segment):
    changed = tokens.clone()
    where = (segment_ids[row] == segment).nonzero().flatten()
    changed[row, where] = (changed[row, where] + 7) % (VOCAB - 4) + 4
    return changed


def run(prefix, tp, pp, zero, mbs, manual=False, isolation=False):
    """Eval losses (both modes), a token-mean step and a per-sequence step, all normalised over the
    global batch (--loss-normalization global-batch); optional checks."""
    from megatron_bloom.training.engine import BloomEngine
    from megatron_bloom.monitoring.group_loss import GroupLossMeter
    from megatron_bloom.training.data import finetune_micro_batches
    from megatron_bloom.training.losses import FinetuningLoss

    cfg = tiny_config(tp, pp, zero, mbs)
    validate_config(cfg, dist.get_world_size())
    state = init_distributed(tp, pp, backend="gloo")
    engine = BloomEngine(cfg, state, loss_class=FinetuningLoss)
    engine.module.loss_fn.meter = GroupLossMeter((2, 3))
    rows = PackedRows(PairedDataset(prefix), 0, 48, 2 * GBS, SEQ, seed=5)
    dp, dp_rank = state.dims.dp, state.dp_rank

    def batches(norm, consumed):
        if not engine.reads_data:
            return []
        return finetune_micro_batches(rows, consumed, GBS, mbs, dp, dp_rank, VOCAB, norm, "global-batch")

    out = {}
    if manual:  # the global means straight from the definition, before any update
        full = finetune_micro_batches(rows, 0, GBS, GBS, 1, 0, VOCAB, False, "global-batch")[0]
        (tokens, seg), (labels, mask, _, _, _) = full
        weight = finetune_micro_batches(rows, 0, GBS, GBS, 1, 0, VOCAB, True, "global-batch")[0][1][1]
        with torch.no_grad():
            engine.engine.eval()
            from megatron_bloom.layers import vocab_parallel_cross_entropy

            losses = vocab_parallel_cross_entropy(_logits_pp1(engine, tokens, seg), labels).double()
        out["manual_token"] = float((losses * mask).sum() / mask.sum())
        out["manual_norm"] = float((losses * weight).sum() / sum(rows.counts(k)[1] for k in range(GBS)))
        out["target_tokens"] = int(mask.sum())
    out["eval_token"] = engine.eval_step(batches(False, 0))
    out["eval_norm"] = engine.eval_step(batches(True, 0))
    if isolation:
        out["isolation"] = _isolation(engine, state, rows, pp, mbs)
    engine.module.loss_fn.meter.reset()
    r1 = engine.train_step(batches(False, 0))
    groups = _reduce(engine, state)
    r2 = engine.train_step(batches(True, GBS))
    out["step1"] = (r1.loss, r1.grad_norm)
    out["step2"] = (r2.loss, r2.grad_norm)
    out["groups_step1"] = groups
    return out


def _reduce(engine, state):
    meter = engine.module.loss_fn.meter
    return meter.reduce(state.is_last_stage and state.tp_rank == 0)


def _isolation(engine, state, rows, pp, mbs):
    """Change one packed sample: the other samples' logits must not change by a single bit."""
    from megatron_bloom.training.data import finetune_micro_batches

    # A micro-batch of the layout's own size: the pipeline engine sends activations of the shape
    # it saw first, so a bigger micro-batch here would not match what the next stage expects.
    first = next(k for k in range(len(rows)) if rows.counts(k)[1] >= 3)  # a row packing 3+ samples
    (tokens, seg), labels = finetune_micro_batches(rows, first, mbs, mbs, 1, 0, VOCAB, False)[0]
    row, batch = 0, tokens.shape[0]
    changed = _changed_copy(tokens, seg, row, 2)

    def logits(t):
        with torch.no_grad():
            if pp == 1:
                engine.engine.eval()
                return _logits_pp1(engine, t, seg)
            _, out = engine.engine.eval_batch(iter([((t, seg), labels)]), return_logits=True, num_micro_batches=1)
            return out

    a, b = logits(tokens), logits(changed)
    if not state.is_last_stage:
        return None
    changed_sample = (seg == 2) & (torch.arange(batch)[:, None] == row)  # [b, s]
    # Padding (segment 0) sees no key, so its softmax is uniform over every key (see alibi.py): its
    # logits do move, but it is never attended to and carries no loss. Every SAMPLE must not move.
    others = (seg != 0) & ~changed_sample
    result = {
        "others_bitwise_equal": bool(torch.equal(a[others], b[others])),
        "changed_sample_differs": not torch.equal(a[changed_sample], b[changed_sample]),
    }
    if pp == 1:
        # A packed sample gives what it gives alone (fresh positions, nothing else to attend to).
        worst = 0.0
        for k in range(1, int(seg[row].max()) + 1):
            where = (seg[row] == k).nonzero().flatten()
            alone_tokens = tokens[row, where][None]
            with torch.no_grad():
                logits_alone = _logits_pp1(engine, alone_tokens, torch.ones_like(alone_tokens))
            alone = a[row, where]
            worst = max(worst, float((logits_alone[0] - alone).abs().max()))
        result["alone_max_abs_diff"] = worst
    return result


T0_MODES = {
    # name: (--norm-target-loss, --eod-mask-loss)
    "default": (False, False),
    "norm-target-loss": (True, False),
    "eod-mask-loss": (False, True),
    "norm-target-loss+eod-mask-loss": (True, True),
}
T0_ROWS = 4 * GBS


def _full_logits(engine, state, tokens, segment_ids):
    """Logits [b, s, padded vocab] of one forward (PP=1), gathered over the TP group."""
    with torch.no_grad():
        engine.engine.eval()
        part = _logits_pp1(engine, tokens, segment_ids).float()
    if state.dims.tp == 1:
        return part
    parts = [torch.empty_like(part) for _ in range(state.dims.tp)]
    dist.all_gather(parts, part.contiguous(), group=state.tp_group)
    return torch.cat(parts, dim=-1)


def run_t0(prefix, tp, mbs):
    """One training step per T0_MODES entry (--loss-normalization micro-batch) at PP=1, each on the
    next global batch: before it, the logits of the whole global batch (for a reference loss computed
    by the test), the evaluation loss, then the step's loss and its per-language/task means."""
    from megatron_bloom.monitoring.group_loss import GroupLossMeter
    from megatron_bloom.training.data import finetune_micro_batches
    from megatron_bloom.training.engine import BloomEngine
    from megatron_bloom.training.losses import FinetuningLoss

    cfg = tiny_config(tp, 1, 1, mbs)
    validate_config(cfg, dist.get_world_size())
    state = init_distributed(tp, 1, backend="gloo")
    engine = BloomEngine(cfg, state, loss_class=FinetuningLoss)
    meter = engine.module.loss_fn.meter = GroupLossMeter((2, 3))
    paired = PairedDataset(prefix)
    rows = PackedRows(paired, 0, len(paired), T0_ROWS, SEQ, seed=5)
    dp, dp_rank = state.dims.dp, state.dp_rank
    out = {}
    for i, (name, (norm, eod_mask)) in enumerate(T0_MODES.items()):
        consumed = i * GBS
        eod = paired.eod_id if eod_mask else None
        batches = finetune_micro_batches(rows, consumed, GBS, mbs, dp, dp_rank, VOCAB, norm, "micro-batch", eod)
        (tokens, seg), _ = finetune_micro_batches(rows, consumed, GBS, GBS, 1, 0, VOCAB, False, "micro-batch")[0]
        logits = _full_logits(engine, state, tokens, seg)
        evaluated = engine.eval_step(batches)
        meter.reset()
        step = engine.train_step(batches)
        groups = meter.reduce(state.is_last_stage and state.tp_rank == 0)
        out[name] = {"consumed": consumed, "logits": logits.numpy(), "eval": evaluated, "step": step.loss,
                     "grad_norm": step.grad_norm, "groups": groups}
    return out
