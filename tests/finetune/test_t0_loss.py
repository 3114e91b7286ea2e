"""The finetuning loss is BLOOMZ's: Megatron-DeepSpeed's finetune_t0.py + GPTModelPipe's CrossEntropy.

The reference below is written from that code, for packed rows in its own format: every row of
``seq_length + 1`` decoder tokens (``decoder_token_ids``, ``decoder_segment_ids``,
``decoder_is_inputs``) is rebuilt from the packing PLAN and the raw pairs, not from our rows'
labels or masks. Then, per micro-batch, as ``get_batch_pipe`` and ``CrossEntropy`` do:

    tokens, labels = ids[:, :-1], ids[:, 1:]
    loss_mask = 1, 0 where tokens == EOD (--eod-mask-loss), times ~is_inputs[:, 1:] and labels != pad
    --norm-target-loss: loss_mask = fast_normalize(loss_mask.view(-1))   (1 / run length)
    loss = sum(token losses * loss_mask) / loss_mask.sum()

and DeepSpeed's step loss is the mean of the micro-batch losses (over accumulation and DP ranks).
Our trainer (``--loss-normalization micro-batch``, the default) must give that for the step and
for evaluation, at micro-batch 2 x 4 accumulation steps on one process, at DP=2 (2 x 2) and at
TP=2 (4 x 2); the token losses come from the same weights (logits of one forward of the whole
global batch, before each step). The pairs hold EOD at the end of some inputs and inside some
targets, so --eod-mask-loss really removes positions and splits runs.

Tolerance 1e-5 relative: fp32; only summation order differs (measured: at most 9e-8). A wrong
normalisation (the global-batch mean, tokens instead of runs, EOD positions kept or lost) moves the
loss by 1e-4 to 2% relative here (at the random initial weights every token loss is near ln 256),
which the test checks for each mode on the same logits: at least 10x the tolerance.
"""
import math

import numpy as np
import pytest
import torch

from megatron_bloom.testing import run_distributed

from finetune_worker import EOD, GBS, SEQ, T0_MODES, T0_ROWS, run_t0, write_pairs

RTOL = 1e-5


# ---- finetune_t0.py's loss, for the test only --------------------------------------------------------


def fast_normalize(loss_mask: torch.Tensor) -> torch.Tensor:
    """finetune_t0.py's: each value over the length of its run of equal values (flattened)."""
    _, inverse, counts = torch.unique_consecutive(loss_mask, return_inverse=True, return_counts=True)
    return loss_mask / torch.gather(counts, 0, inverse)


def t0_micro_batch_loss(decoder, token_losses_fn, eod_mask_loss, norm_target_loss, pad, eod=EOD):
    """(loss, mask [b*s]) of one micro-batch: get_batch_pipe's masking, then CrossEntropy."""
    ids = torch.as_tensor(np.stack([d["decoder_token_ids"] for d in decoder]))
    is_inputs = torch.as_tensor(np.stack([d["decoder_is_inputs"] for d in decoder]))
    tokens, labels = ids[:, :-1], ids[:, 1:]
    loss_mask = torch.ones(tokens.shape, dtype=torch.float)
    if eod_mask_loss:
        loss_mask[tokens == eod] = 0.0
    loss_mask *= ~is_inputs[:, 1:] * (labels != pad)
    if norm_target_loss:
        loss_mask = fast_normalize(loss_mask.view(-1))
    losses = token_losses_fn(labels)
    loss = torch.sum(losses.view(-1) * loss_mask.view(-1)) / loss_mask.sum()
    return float(loss), loss_mask.view(-1)


def decoder_row(rows, k):
    """Row k as DecoderPackedMTFDataset.pack_samples would give its items (from the plan)."""
    paired = rows.paired
    ids = np.full(SEQ + 1, paired.pad_id, dtype=np.int64)
    segments = np.zeros(SEQ + 1, dtype=np.int64)
    is_inputs = np.zeros(SEQ + 1, dtype=bool)
    language = np.zeros(SEQ + 1, dtype=np.int64)
    task = np.zeros(SEQ + 1, dtype=np.int64)
    pos = 0
    for seg, j in enumerate(range(int(rows.row_ptr[k]), int(rows.row_ptr[k + 1])), start=1):
        pair = int(rows.pair[j])
        x = paired.inputs(pair, keep_last=int(rows.kept_inputs[j]))
        y = paired.targets(pair)
        ids[pos:pos + len(x) + len(y)] = np.concatenate([x, y])
        segments[pos:pos + len(x) + len(y)] = seg
        is_inputs[pos:pos + len(x)] = True
        language[pos:pos + len(x) + len(y)] = paired.language_ids[pair]
        task[pos:pos + len(x) + len(y)] = paired.dataset_ids[pair]
        pos += len(x) + len(y)
    return {"decoder_token_ids": ids, "decoder_segment_ids": segments, "decoder_is_inputs": is_inputs,
            "language": language, "task": task}


def reference(rows, result, mbs, norm_target_loss, eod_mask_loss):
    """finetune_t0.py's step loss over the global batch at ``result['consumed']`` and the per-group
    weighted means of the token losses (what the group-loss meter should report)."""
    logits = torch.as_tensor(result["logits"])  # [GBS, SEQ, padded vocab], global batch order
    n = len(rows)
    decoder = [decoder_row(rows, (result["consumed"] + i) % n) for i in range(GBS)]
    losses, sums = [], [np.zeros((2, 2)), np.zeros((2, 3))]
    for start in range(0, GBS, mbs):
        part = decoder[start:start + mbs]

        def token_losses(labels, start=start):
            lg = logits[start:start + len(labels)]
            return torch.nn.functional.cross_entropy(lg.reshape(-1, lg.shape[-1]), labels.reshape(-1),
                                                     reduction="none").view(labels.shape)

        loss, mask = t0_micro_batch_loss(part, token_losses, eod_mask_loss, norm_target_loss, rows.paired.pad_id)
        losses.append(loss)
        labels = torch.as_tensor(np.stack([d["decoder_token_ids"][1:] for d in part]))
        per_token = token_losses(labels).view(-1).double().numpy()
        w = mask.double().numpy()
        for g, key in enumerate(("language", "task")):
            ids = np.concatenate([d[key][:-1] for d in part])  # the group of the predicting position
            np.add.at(sums[g][0], ids, per_token * w)
            np.add.at(sums[g][1], ids, w)
    groups = [{i: s[0, i] / s[1, i] for i in range(s.shape[1]) if s[1, i] > 0} for s in sums]
    return sum(losses) / len(losses), groups


def close(a, b):
    return math.isclose(a, b, rel_tol=RTOL)


# ---- the comparison ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    prefix = str(tmp_path_factory.mktemp("t0pairs") / "pairs")
    write_pairs(prefix, eod_inside=True)
    return prefix


@pytest.fixture(scope="module")
def rows(pairs):
    from megatron_bloom.data.packing import PackedRows
    from megatron_bloom.data.xp3 import PairedDataset

    paired = PairedDataset(pairs)
    return PackedRows(paired, 0, len(paired), T0_ROWS, SEQ, seed=5)  # as run_t0 builds them


LAYOUTS = {
    # name: (world size, tp, micro batch size); GBS 8
    "mbs2-gas4": (1, 1, 2),
    "dp2-mbs2-gas2": (2, 1, 2),
    "tp2-mbs4-gas2": (2, 2, 4),
}


@pytest.mark.distributed
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_step_loss_is_finetune_t0s(pairs, rows, name):
    world, tp, mbs = LAYOUTS[name]
    out = run_distributed(run_t0, world, pairs, tp, mbs, timeout=300)[-1]
    for mode, (norm, eod_mask) in T0_MODES.items():
        r = out[mode]
        ref, groups = reference(rows, r, mbs, norm, eod_mask)
        assert close(r["step"], ref), (mode, r["step"], ref)
        assert close(r["eval"], ref), (mode, r["eval"], ref)
        assert r["grad_norm"] is not None and math.isfinite(r["grad_norm"])
        # The meter's per-group means: the same weights, summed over every micro-batch and rank.
        for got, want in zip(r["groups"], groups):
            assert set(got) == set(want), (mode, got, want)
            for k in want:
                assert math.isclose(got[k], want[k], rel_tol=RTOL), (mode, k, got[k], want[k])
        # The reference discriminates: other flags on the same logits give other numbers.
        for other, (o_norm, o_eod) in T0_MODES.items():
            if (o_norm, o_eod) != (norm, eod_mask):
                assert not close(ref, reference(rows, r, mbs, o_norm, o_eod)[0]), (mode, other)
        # Per micro-batch means are not the global-batch mean (token or per target).
        global_mean = reference(rows, r, GBS, norm, eod_mask)[0]
        assert not close(ref, global_mean), (mode, ref, global_mean)


# ---- the pieces, without processes ---------------------------------------------------------------


@pytest.fixture
def tokenizer_dir(tmp_path):
    """A tokenizer folder whose EOS ``</s>`` is id 0."""
    import json

    from tokenizers import Tokenizer, models

    folder = tmp_path / "tok"
    folder.mkdir()
    Tokenizer(models.WordLevel({"</s>": 0, "<pad>": 1, "a": 2}, unk_token="a")).save(str(folder / "tokenizer.json"))
    (folder / "special_tokens_map.json").write_text(json.dumps({"eos_token": "</s>", "pad_token": "<pad>"}))
    return folder


class CrossingRows:
    """Rows whose targets touch across rows, as Megatron-DeepSpeed packing can make them: row k's
    last position predicts a target (of the next token) and row k+1 starts with a one-token input."""

    def __init__(self):
        self.masks = [np.array(m, np.float32) for m in (
            [0, 1, 1, 0, 0, 1, 1, 1],   # ends in a run ...
            [1, 1, 0, 0, 0, 1, 0, 0],   # ... that this row's first run continues (flattened)
            [0, 0, 1, 0, 1, 1, 1, 1],
            [1, 0, 0, 0, 0, 0, 0, 0],
        )]

    def __len__(self):
        return len(self.masks)

    def counts(self, k):
        return int(self.masks[k].sum()), 2

    def __getitem__(self, k):
        mask = self.masks[k]
        tokens = np.arange(8, dtype=np.int64) + 4
        tokens[5] = EOD if k == 2 else tokens[5]  # row 2: EOD inside its last run
        return {"tokens": tokens, "labels": tokens, "loss_mask": mask, "sequence_weight": mask / 2,
                "segment_ids": np.ones(8, np.int64), "language": np.zeros(8, np.int64),
                "task": np.zeros(8, np.int64)}


@pytest.mark.parametrize("mbs", [1, 2, 4])
def test_runs_are_counted_over_the_flattened_micro_batch(mbs):
    from megatron_bloom.training.data import finetune_micro_batches, run_normalized

    rows = CrossingRows()
    for eod in (None, EOD):
        batches = finetune_micro_batches(rows, 0, 4, mbs, 1, 0, 100, True, "micro-batch", eod)
        for j, (_, (_, weights, norm, _, _)) in enumerate(batches):
            mask = torch.as_tensor(np.stack([rows[k]["loss_mask"] for k in range(j * mbs, (j + 1) * mbs)]))
            if eod is not None:
                mask = mask * (torch.as_tensor(np.stack([rows[k]["tokens"] for k in range(j * mbs, (j + 1) * mbs)])) != eod)
            want = fast_normalize(mask.reshape(-1)).view(mask.shape)
            assert torch.equal(weights, want), (mbs, eod, j, weights, want)
            assert norm.tolist() == [1.0, 1.0]
    # Micro-batch 4 (all rows): runs 2 + (1 merged across rows 0/1) + 1 + 2 + (1 merged) ... as T0 counts.
    all_rows = torch.as_tensor(np.stack(rows.masks))
    assert math.isclose(float(run_normalized(all_rows).sum()), 5.0, rel_tol=1e-6)
    # EOD at row 2, position 5 splits its last run in two.
    assert torch.equal(run_normalized(torch.tensor([0., 1, 1, 0, 1, 0, 1, 1])), torch.tensor([0., .5, .5, 0, 1, 0, .5, .5]))


def test_loss_function_divides_per_micro_batch_or_scales_globally():
    from megatron_bloom.training.losses import FinetuningLoss

    torch.manual_seed(0)
    logits = torch.randn(2, 6, 16)
    labels = torch.randint(0, 16, (2, 6))
    weights = torch.tensor([[0, 1, 1, 0, 0, 1], [0, 0, 0, 1, 1, 0]], dtype=torch.float)
    losses = torch.nn.functional.cross_entropy(logits.view(-1, 16), labels.view(-1), reduction="none").view(2, 6)
    loss_fn = FinetuningLoss(None, 0)
    groups = (torch.zeros(2, 6, dtype=torch.long), torch.zeros(2, 6, dtype=torch.long))
    micro = loss_fn(logits, (labels, weights, torch.tensor([1.0, 1.0]), *groups))
    assert math.isclose(float(micro), float((losses * weights).sum() / weights.sum()), rel_tol=1e-6)
    scale = torch.tensor([0.37, 0.0])
    globally = loss_fn(logits, (labels, weights, scale, *groups))
    assert torch.equal(globally, (loss_fn.__class__(None, 0)(logits, (labels, weights, scale[:1], *groups))))
    # No loss-bearing token in a micro-batch: 0, where finetune_t0.py would divide 0 by 0.
    empty = loss_fn(logits, (labels, torch.zeros_like(weights), torch.tensor([1.0, 1.0]), *groups))
    assert float(empty) == 0.0


def test_eod_mask_loss_is_refused_where_it_cannot_apply():
    from megatron_bloom.errors import UserError
    from megatron_bloom.training.data import finetune_micro_batches

    with pytest.raises(UserError, match="micro-batch"):
        finetune_micro_batches(CrossingRows(), 0, 4, 2, 1, 0, 100, False, "global-batch", EOD)
    with pytest.raises(ValueError, match="micro-batch, global-batch"):
        finetune_micro_batches(CrossingRows(), 0, 4, 2, 1, 0, 100, False, "per-token")


def test_eod_id_comes_from_the_pairs_or_the_tokenizer(tokenizer_dir):
    from types import SimpleNamespace as NS

    from megatron_bloom.errors import UserError
    from megatron_bloom.training.finetune import eod_id_of

    ours, theirs = NS(paired=NS(eod_id=2)), NS(paired=NS(eod_id=None))
    assert eod_id_of([NS(datasets=[ours, ours]), ours]) == 2
    with pytest.raises(UserError, match="different EOD ids"):
        eod_id_of([ours, theirs], str(tokenizer_dir))  # the tokenizer's EOS is 0 here
    with pytest.raises(UserError, match="different EOD ids"):
        eod_id_of([NS(datasets=[ours, NS(paired=NS(eod_id=5))])])
    with pytest.raises(UserError, match="--tokenizer-name-or-path"):
        eod_id_of([theirs])
    assert eod_id_of([theirs], str(tokenizer_dir)) == 0
    with pytest.raises(UserError, match="did not load"):
        eod_id_of([theirs], str(tokenizer_dir / "missing"))


def test_flags_their_defaults_and_refusals(repo_root, monkeypatch):
    import os

    from megatron_bloom.errors import UserError
    from megatron_bloom.training.finetune import resolve_finetune_config

    for k in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(k, raising=False)
    base = ["--train-iters", "2", "--data-path", "unused"]
    f = resolve_finetune_config(base)[0].finetune
    assert (f.loss_normalization, f.norm_target_loss, f.eod_mask_loss, f.loss_on_targets_only) == (
        "micro-batch", False, False, False)
    f = resolve_finetune_config(base + ["--norm-target-loss", "--eod-mask-loss", "--loss-on-targets-only"])[0].finetune
    assert f.norm_target_loss and f.eod_mask_loss and f.loss_on_targets_only
    f = resolve_finetune_config(base + ["--loss-normalization", "global-batch", "--norm-target-loss"])[0].finetune
    assert f.loss_normalization == "global-batch"
    for extra, message in (
        (["--reweight-loss-based-on-position-frequency"], "prefix-LM"),
        (["--loss-normalization", "global-batch", "--eod-mask-loss"], "needs --loss-normalization micro-batch"),
        (["--loss-normalization", "per-token"], "micro-batch, global-batch"),
    ):
        with pytest.raises(UserError, match=message):
            resolve_finetune_config(base + extra)
    # The shipped finetuning configs: finetune_t0.py's per micro-batch normalisation, BLOOMZ per target.
    monkeypatch.setenv("RANK", "0")
    for name, world, norm in (("bloomz-7b1.yaml", 32, True), ("demo-finetune.yaml", 2, False),
                              ("finetune-tp2-pp2.yaml", 4, False)):
        monkeypatch.setenv("WORLD_SIZE", str(world))
        cfg, _ = resolve_finetune_config(["--config", os.path.join(repo_root, "configs", name), "--data-path", "x"])
        assert cfg.finetune.loss_normalization == "micro-batch" and cfg.finetune.norm_target_loss == norm, name
        assert not cfg.finetune.eod_mask_loss, name


@pytest.mark.parametrize("norm_target_loss, eod_mask_loss", list(T0_MODES.values()))
def test_megatron_deepspeed_packed_rows_give_finetune_t0s_loss(tmp_path, norm_target_loss, eod_mask_loss):
    """Rows packed as DecoderPackedMTFDataset packs them (data/mtf.py) fed to our loss equal
    finetune_t0.py's on its own decoder arrays (``MTFPackedRows.packed``), for micro-batches of 1,
    2 and 4 rows. Every pair is 4 tokens, so rows of 16 are full to their last token and a target
    ending one row touches the target of the next row's first pair (whose input may be 1 token):
    fast_normalize then counts the two as one run, and so must we."""
    from megatron_bloom.data.mtf import MegatronDeepSpeedPairs, MegatronDeepSpeedPairsWriter, MTFPackedRows
    from megatron_bloom.training.data import finetune_micro_batches
    from megatron_bloom.training.losses import FinetuningLoss

    vocab, seq, pad = 50, 15, 3
    rng = np.random.RandomState(3)
    inputs, targets = [], []
    for i in range(32):
        n_in = 1 + i % 2
        inputs.append(rng.randint(4, vocab, size=n_in))
        targets.append(np.append(rng.randint(4, vocab, size=3 - n_in), EOD))
        if i % 5 == 0:
            inputs[-1][-1] = EOD  # --eod-mask-loss then drops the prediction of the first target token
    prefix = str(tmp_path / "mds")
    writer = MegatronDeepSpeedPairsWriter(prefix, np.uint16)
    writer.add_pairs(inputs, targets, ["en"] * 32)
    writer.commit()
    rows = MTFPackedRows(MegatronDeepSpeedPairs(prefix, pad), 0, 32, 16, seq, seed=1)
    torch.manual_seed(0)
    logits = torch.randn(16, seq, vocab)
    loss_fn = FinetuningLoss(None, 0)
    merged = False
    for mbs in (1, 2, 4):
        batches = finetune_micro_batches(rows, 0, 16, mbs, 1, 0, vocab, norm_target_loss, "micro-batch",
                                         EOD if eod_mask_loss else None)
        ours = [float(loss_fn(logits[j * mbs:(j + 1) * mbs], labels)) for j, (_, labels) in enumerate(batches)]
        ref = []
        for j in range(16 // mbs):
            part = [rows.packed(k) for k in range(j * mbs, (j + 1) * mbs)]

            def token_losses(labels, j=j):
                lg = logits[j * mbs:(j + 1) * mbs]
                return torch.nn.functional.cross_entropy(lg.reshape(-1, vocab), labels.reshape(-1),
                                                         reduction="none").view(labels.shape)

            loss, mask = t0_micro_batch_loss(part, token_losses, eod_mask_loss, norm_target_loss, pad)
            ref.append(loss)
            targets_here = sum(rows.counts(k)[1] for k in range(j * mbs, (j + 1) * mbs))
            merged |= norm_target_loss and not eod_mask_loss and float(mask.sum()) < targets_here - 0.5
        assert np.allclose(ours, ref, rtol=1e-6), (mbs, ours, ref)
    assert merged or not norm_target_loss or eod_mask_loss  # runs did cross rows in these micro-batches
