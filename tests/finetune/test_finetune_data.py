"""xP3 data without processes: synthetic tasks, paired preprocessing, mixtures, packing, micro-batches."""
import json
import os

import numpy as np
import pytest

from finetune_helpers import REPO, read_rows, run_tool

from megatron_bloom.data.packing import PackedRows, pack_pairs, plan_pairs
from megatron_bloom.data.xp3 import PairedDataset, PairedDatasetWriter, read_weighted_split_paths_file


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    d = tmp_path_factory.mktemp("tasks")
    run_tool("data_tools/make_tasks.py", "--output", str(d / "tasks"), "--num-train", "400", "--num-heldout", "60",
             "--corpus", str(d / "corpus.jsonl"), "--corpus-lines", "300", "--seed", "3")
    texts = [{"text": r["inputs"] + " " + r["targets"]} for r in read_rows(str(d / "tasks"))]
    with open(d / "tok.jsonl", "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(t, ensure_ascii=False) + "\n" for t in texts)
    run_tool("data_tools/train_tokenizer.py", "--input", str(d / "tok.jsonl"), "--vocab-size", "400",
             "--output-dir", str(d / "tok"))
    return d


def test_make_tasks_is_deterministic_and_held_out_items_are_new(tasks, tmp_path):
    run_tool("data_tools/make_tasks.py", "--output", str(tmp_path / "again"), "--num-train", "400",
             "--num-heldout", "60", "--corpus", str(tmp_path / "corpus.jsonl"), "--corpus-lines", "300", "--seed", "3")
    for split in ("train", "heldout"):
        assert read_rows(str(tasks / "tasks" / split)) == read_rows(str(tmp_path / "again" / split))
    train, held = read_rows(str(tasks / "tasks" / "train")), read_rows(str(tasks / "tasks" / "heldout"))
    assert {r["dataset"] for r in train} == {"translate", "add", "copy", "reverse"}
    assert {r["language"] for r in train} == {"en", "fr", "es", "de"}
    assert not {r["inputs"] for r in held} & {r["inputs"] for r in train}
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_tasks", os.path.join(REPO, "data_tools", "make_tasks.py"))
    mt = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mt)
    for task in mt.TASKS:  # the item split is language independent and disjoint
        tr, ho = mt.split_items(task, mt.task_items(task, 3), 0.1, 3)
        assert tr and ho and not set(tr) & set(ho)
    # Answers are checkable: e.g. every add row's target is the sum.
    for r in train:
        if r["dataset"] == "add":
            a, b = r["inputs"].split(":")[-1].split("=")[0].split("+")
            assert int(r["targets"]) == int(a) + int(b)


def test_preprocess_pairs_round_trip_names_and_mixture(tasks, tmp_path):
    from megatron_bloom.data.tokenizer import load_tokenizer

    out = str(tmp_path / "xp3")
    p = run_tool("data_tools/preprocess_xp3.py", "--input", str(tasks / "tasks" / "train"), "--output-prefix", out,
                 "--tokenizer-name-or-path", str(tasks / "tok"), "--prepend-space", "--split-by", "language")
    assert "400 pairs" in p.stderr and "skipped 0 bad lines" in p.stderr
    tok = load_tokenizer(str(tasks / "tok"))
    rows = {lang: read_rows(str(tasks / "tasks" / "train" / lang)) for lang in ("de", "en", "es", "fr")}
    for lang, lang_rows in rows.items():
        d = PairedDataset(f"{out}_{lang}")
        assert len(d) == len(lang_rows) and d.languages == [lang]
        for i in (0, len(d) // 2, len(d) - 1):
            r = lang_rows[i]
            assert d.inputs(i).tolist() == tok.encode(r["inputs"])
            assert d.targets(i).tolist() == tok.encode(" " + r["targets"]) + [tok.eod_id]  # --prepend-space, EOD
            assert d.datasets[d.dataset_ids[i]] == r["dataset"] and d.templates[d.template_ids[i]] == r["template"]
    groups = read_weighted_split_paths_file(out + ".mixture.txt", "--train-weighted-split-paths-path")
    from megatron_bloom.data.blends import parse_weighted_split_paths

    (group,) = parse_weighted_split_paths(groups, "--train-weighted-split-paths")
    assert [os.path.basename(e.prefix) for e in group.entries] == ["xp3_de", "xp3_en", "xp3_es", "xp3_fr"]
    counts = [len(rows[l]) for l in ("de", "en", "es", "fr")]
    assert np.allclose(group.weights, np.array(counts) / sum(counts), rtol=1e-5)  # --mixture-weights pairs


def test_language_and_dataset_fall_back_to_folder_and_file(tasks, tmp_path):
    (tmp_path / "in" / "sw").mkdir(parents=True)
    (tmp_path / "in" / "sw" / "qa_task.jsonl").write_text(
        json.dumps({"inputs": "a b", "targets": "c"}) + "\n"
        + json.dumps({"inputs": "d", "targets": "e", "language": "yo", "dataset": "other"}) + "\n")
    run_tool("data_tools/preprocess_xp3.py", "--input", str(tmp_path / "in"), "--output-prefix", str(tmp_path / "o"),
             "--tokenizer-name-or-path", str(tasks / "tok"))
    d = PairedDataset(str(tmp_path / "o"))
    assert [d.languages[i] for i in d.language_ids] == ["sw", "yo"]
    assert [d.datasets[i] for i in d.dataset_ids] == ["qa_task", "other"]


def test_bad_lines_are_named_or_counted(tasks, tmp_path):
    import subprocess
    import sys

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"inputs": "x", "targets": "y"}) + "\n" + json.dumps({"inputs": "x"}) + "\n")
    args = [sys.executable, "data_tools/preprocess_xp3.py", "--input", str(bad), "--output-prefix", str(tmp_path / "o"),
            "--tokenizer-name-or-path", str(tasks / "tok")]
    p = subprocess.run(args, capture_output=True, text=True, cwd=REPO)
    assert p.returncode == 2 and f"{bad}:2: key 'targets' is missing" in p.stderr and "Traceback" not in p.stderr
    assert not os.path.exists(str(tmp_path / "o.idx")) and not os.path.exists(str(tmp_path / "o.bin.tmp"))
    p = subprocess.run(args + ["--skip-bad-lines"], capture_output=True, text=True, cwd=REPO)
    assert p.returncode == 0 and "skipped 1 bad lines" in p.stderr
    assert len(PairedDataset(str(tmp_path / "o"))) == 1


def test_paired_dataset_refuses_plain_and_mismatched_files(tmp_path):
    from megatron_bloom.data.indexed_dataset import IndexedDatasetError, MMapIndexedDatasetBuilder

    plain = str(tmp_path / "plain")
    b = MMapIndexedDatasetBuilder(plain + ".bin", np.uint16)
    b.add_item([1, 2, 3])
    b.end_document()
    b.finalize(plain + ".idx")
    with pytest.raises(IndexedDatasetError, match="plain pretraining dataset"):
        PairedDataset(plain)
    prefix = str(tmp_path / "p")
    w = PairedDatasetWriter(prefix, np.uint16)
    w.add_pairs([np.array([5, 6])], [np.array([7, 2])], ["en"], ["t"], [""])
    w.commit()
    np.save(prefix + ".pairs.npy", np.zeros((2, 3), np.int32))
    with pytest.raises(IndexedDatasetError, match="expected"):
        PairedDataset(prefix)


# ---- packing -------------------------------------------------------------------------------------


def test_best_fit_decreasing_places_every_pair_once_with_little_padding():
    rng = np.random.RandomState(0)
    inp, tgt = rng.randint(1, 300, 5000), rng.randint(1, 80, 5000)
    pack = pack_pairs(inp, tgt, 512, seed=1)
    assert sorted(pack.pair.tolist()) == list(range(5000))  # nothing overlong here: every pair, once
    per_row = np.add.reduceat(pack.kept_inputs + pack.targets, pack.row_ptr[:-1])
    assert per_row.max() <= 512 and pack.stats.fill_rate > 0.98
    again, other = pack_pairs(inp, tgt, 512, seed=1), pack_pairs(inp, tgt, 512, seed=2)
    assert np.array_equal(again.pair, pack.pair) and np.array_equal(again.row_ptr, pack.row_ptr)
    assert not np.array_equal(other.pair, pack.pair)
    assert "fill rate" in pack.stats.line("x")


def test_overlong_pairs_truncated_from_the_left_or_skipped_and_counted():
    inp = np.array([10, 50, 3, 1, 0])
    tgt = np.array([5, 5, 40, 32, 4])  # seq 32: pair 1 overlong, 2 and 3 targets too long, 4 no inputs
    keep, kept, stats = plan_pairs(inp, tgt, 32, "truncate")
    assert keep.tolist() == [True, True, False, False, False] and kept[1] == 27
    assert (stats.truncated, stats.truncated_tokens, stats.skipped_unfittable) == (1, 23, 3)
    keep, _, stats = plan_pairs(inp, tgt, 32, "skip")
    assert keep.tolist() == [True, False, False, False, False]
    assert (stats.truncated, stats.skipped_overlong, stats.skipped_unfittable) == (0, 1, 3)
    with pytest.raises(ValueError, match="truncate"):
        plan_pairs(inp, tgt, 32, "drop")


def _write(prefix, pairs, langs=None):
    w = PairedDatasetWriter(prefix, np.uint16, {"eod_id": 2, "pad_id": 3})
    n = len(pairs)
    w.add_pairs([np.array(i) for i, _ in pairs], [np.array(t) for _, t in pairs], langs or ["en"] * n,
                ["t"] * n, [""] * n)
    w.commit()
    return PairedDataset(prefix)


def test_rows_mask_exactly_the_targets_and_restart_segments(tmp_path):
    rng = np.random.RandomState(1)
    pairs = [(rng.randint(10, 99, rng.randint(1, 12)).tolist(), rng.randint(10, 99, rng.randint(1, 6)).tolist() + [2])
             for _ in range(40)]
    pairs.append((list(range(10, 60)), [70, 71, 2]))  # overlong: inputs cut from the left
    d = _write(str(tmp_path / "p"), pairs, ["en", "fr"] * 20 + ["en"])
    rows = PackedRows(d, 0, len(d), 1, 32, seed=0)
    seen = set()
    for k in range(len(rows)):
        r = rows[k]
        segs = r["segment_ids"]
        assert set(np.unique(segs)) - {0} == set(range(1, int(segs.max()) + 1))
        real = segs > 0
        assert (np.diff(segs[real]) >= 0).all()  # each sample one contiguous run, numbered in order
        if (~real).any():
            assert not real[np.argmax(~real):].any()  # padding only at the end
        assert r["loss_mask"].sum() == rows.counts(k)[0]
        for j, s in zip(range(rows.row_ptr[k], rows.row_ptr[k + 1]), range(1, 100)):
            pair = int(rows.pair[j])
            seen.add(pair)
            where = np.flatnonzero(segs == s)
            inputs, target = pairs[pair]
            kept = inputs[-int(rows.kept_inputs[j]):]
            assert r["tokens"][where].tolist() == kept + target
            assert r["labels"][where][r["loss_mask"][where] > 0].tolist() == target  # exactly the targets
            assert np.isclose(r["sequence_weight"][where].sum(), 1.0)
            assert (r["language"][where] == (pair % 2 if pair < 40 else 0)).all()
        assert (r["loss_mask"][segs == 0] == 0).all()
    assert seen == set(range(len(pairs)))
    assert rows.stats.truncated == 1 and rows.kept_inputs[list(rows.pair).index(40)] == 29


def test_micro_batch_scales_make_the_global_mean_for_every_split():
    """sum over micro-batches and ranks of (weights * scale) / (accumulation * DP) = 1 exactly as planned."""
    from megatron_bloom.training.data import finetune_micro_batches

    class Rows:
        def __init__(self):
            rng = np.random.RandomState(0)
            self.t = rng.randint(1, 9, size=(16, 4))  # per row: 4 segments, their target lengths

        def __len__(self):
            return 16

        def counts(self, k):
            return int(self.t[k].sum()), 4

        def __getitem__(self, k):
            mask = np.zeros(8 * 4, np.float32)
            weight = np.zeros_like(mask)
            for s, n in enumerate(self.t[k]):
                mask[s * 8:s * 8 + n] = 1
                weight[s * 8:s * 8 + n] = 1.0 / n
            zeros = np.zeros(32, np.int64)
            return {"tokens": zeros, "labels": zeros, "loss_mask": mask, "sequence_weight": weight,
                    "segment_ids": zeros + 1, "language": zeros, "task": zeros}

    rows = Rows()
    for norm in (False, True):
        for mbs, dp in ((8, 1), (2, 1), (2, 2), (1, 4), (4, 2)):
            gas = 8 // (mbs * dp)
            total = 0.0
            for rank in range(dp):
                for _, (_, weights, scale, _, _) in finetune_micro_batches(rows, 8, 8, mbs, dp, rank, 10, norm):
                    total += float(weights.double().sum()) * float(scale[0])
            assert np.isclose(total / (gas * dp), 1.0, rtol=1e-6), (norm, mbs, dp, total)
