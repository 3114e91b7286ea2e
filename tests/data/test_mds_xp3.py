"""Megatron-DeepSpeed's xP3 pairs: the two-file format, bigscience mixture files, DecoderPackedMTFDataset packing.

The references below are written here from Megatron-DeepSpeed's documented behaviour (branch
t0loading: megatron/arguments.py's ``parse_data_paths(_path)``, megatron/data/
decoder_packed_mtf_dataset.py, finetune_t0.py's get_batch_pipe, tools/preprocess_data.py), one
step at a time and without the code under test, so that a drift in either shows here.
"""
import json
import os
import struct
import subprocess
import sys

import numpy as np
import pytest

from megatron_bloom.data.blends import parse_weighted_split_paths, weighted_split_group_text, weighted_split_paths_file_text
from megatron_bloom.data.indexed_dataset import MMapIndexedDatasetBuilder
from megatron_bloom.data.mtf import (
    MegatronDeepSpeedPairs,
    MTFPackedRows,
    names_from_prefix,
    open_pairs,
    pair_format,
)
from megatron_bloom.data.xp3 import PairedDataset, PairedDatasetWriter, read_weighted_split_paths_file
from megatron_bloom.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# ---- references --------------------------------------------------------------------------------


def mds_parse_paths_path(path):
    """Megatron-DeepSpeed's --*-weighted-split-paths-path: (names, weights, splits, paths), asserting as it does."""
    with open(path, "r") as fi:
        lines = fi.readlines()
    assert len(lines) == 1, f"Got multiple lines {len(lines)} instead of 1 expected"
    assert lines[0][-2:] == "\"\n" and lines[0][0] == "\"", f"Invalid input format, got {lines}"
    values = lines[0][1:-2].split("\" \"")
    return mds_parse_paths(values)


def mds_parse_paths(values):
    """Megatron-DeepSpeed's parse_data_paths on the groups (one argv element each)."""
    for v in values:
        prefix = ":".join(v.split(":")[1:])
        for d in prefix.split(","):
            assert len(d.split()) == 3, f"entry {d!r} is not 'WEIGHT START:END PATH'"
            start, end = d.split()[1].split(":")
            assert float(start) < float(end)
    names = [v.split(":")[0] for v in values]
    prefixes = [":".join(v.split(":")[1:]).strip() for v in values]
    weights = [[d.split()[0] for d in p.split(",")] for p in prefixes]
    splits = [[d.split()[1] for d in p.split(",")] for p in prefixes]
    paths = [[d.split()[2] for d in p.split(",")] for p in prefixes]
    return names, weights, splits, paths


def reference_rows(input_sizes, target_sizes, first, num_samples, seq_length, seed):
    """DecoderPackedMTFDataset's rows as lists of pair ids (plus epochs), one pair at a time.

    Rows hold seq_length + 1 tokens; a pair that does not fit closes the row; a pair longer than a
    row is skipped; the open row carries into the next epoch; epochs are added while there are
    <= num_samples rows. (Pair ids are offset by the range start, see mtf.py.)
    """
    cap = seq_length + 1
    n = len(input_sizes)
    rng = np.random.RandomState(seed=seed)
    stream, rows = [], []
    row_length, row_start, epoch = 0, 0, 0
    while len(rows) <= num_samples:
        order = np.arange(n, dtype=np.int64)
        rng.shuffle(order)
        stream.extend(order.tolist())
        for k, doc in enumerate(order.tolist()):
            pos = epoch * n + k
            size = int(input_sizes[doc] + target_sizes[doc])
            row_length += size
            if row_length > cap:
                if pos > row_start:
                    rows.append((row_start, pos))
                row_start, row_length = pos, size
                if size > cap:
                    row_start, row_length = pos + 1, 0
        epoch += 1
    return [[first + stream[p] for p in range(s, e)] for s, e in rows], epoch


def reference_batch(inputs, targets, pair_ids, seq_length, pad):
    """pack_samples + get_batch_pipe: tokens, labels, loss mask (targets only), segment ids, 1/len weights."""
    cap = seq_length + 1
    tok, seg, is_in = [pad] * cap, [0] * cap, [False] * cap
    cur = 0
    for item, p in enumerate(pair_ids, start=1):
        x, y = list(inputs[p]), list(targets[p])
        tok[cur:cur + len(x) + len(y)] = x + y
        seg[cur:cur + len(x) + len(y)] = [item] * (len(x) + len(y))
        is_in[cur:cur + len(x)] = [True] * len(x)
        cur += len(x) + len(y)
    loss = [float((not is_in[i + 1]) and seg[i + 1] != 0) for i in range(seq_length)]
    weight = [loss[i] / len(targets[pair_ids[seg[i + 1] - 1]]) if loss[i] else 0.0 for i in range(seq_length)]
    return {"tokens": tok[:-1], "labels": tok[1:], "loss_mask": loss, "segment_ids": seg[:-1], "sequence_weight": weight}


def write_mds(prefix, inputs, targets, dtype=np.uint16, drop_target=None):
    """The two files as preprocess_data.py writes them: one sequence per document."""
    for key, seqs in (("inputs", inputs), ("targets", targets)):
        b = MMapIndexedDatasetBuilder(f"{prefix}_{key}_document.bin", dtype)
        for i, s in enumerate(seqs):
            if key == "targets" and i == drop_target:
                continue
            b.add_item(np.asarray(s))
            b.end_document()
        b.finalize(f"{prefix}_{key}_document.idx")


def mmidx_bytes(seqs, dtype=np.uint16, code=8):
    """(.bin, .idx) bytes of one-sequence documents, from the MMIDIDX layout itself."""
    sizes = [len(s) for s in seqs]
    item = np.dtype(dtype).itemsize
    pointers = np.concatenate(([0], np.cumsum(sizes)[:-1] * item)).astype(np.int64) if sizes else np.zeros(0, np.int64)
    idx = b"MMIDIDX\x00\x00" + struct.pack("<Q", 1) + struct.pack("<B", code) + struct.pack("<Q", len(sizes))
    idx += struct.pack("<Q", len(sizes) + 1) + np.asarray(sizes, np.int32).tobytes() + pointers.tobytes()
    idx += np.arange(len(sizes) + 1, dtype=np.int64).tobytes()
    return b"".join(np.asarray(s, dtype).tobytes() for s in seqs), idx


@pytest.fixture
def tiny(tmp_path):
    """Pairs with sizes 3..9 tokens and one pair (index 4) longer than a row of seq_length 12 + 1."""
    rng = np.random.RandomState(0)
    in_sizes = [2, 3, 4, 1, 11, 2, 5, 3, 2, 6]
    tg_sizes = [1, 2, 2, 3, 4, 1, 2, 3, 1, 2]
    inputs = [list(rng.randint(10, 100, n)) for n in in_sizes]
    targets = [list(rng.randint(100, 200, n - 1)) + [2] for n in tg_sizes]  # EOD (2) last
    prefix = str(tmp_path / "xp3_train_en")
    write_mds(prefix, inputs, targets)
    return prefix, inputs, targets


# ---- format --------------------------------------------------------------------------------------


def test_two_file_pairs_open_with_names_from_the_prefix(tiny):
    prefix, inputs, targets = tiny
    assert pair_format(prefix) == "megatron-deepspeed"
    pairs = open_pairs(prefix, pad_id=0)
    assert isinstance(pairs, MegatronDeepSpeedPairs) and len(pairs) == 10
    assert pairs.inputs(4).tolist() == inputs[4] and pairs.targets(6).tolist() == targets[6]
    assert pairs.inputs(4, keep_last=3).tolist() == inputs[4][-3:]
    assert (pairs.languages, pairs.datasets) == (["en"], ["xp3"])
    assert names_from_prefix("/d/xp3cappedmixednewcodelong/xp3_code") == ("code", "xp3")
    assert names_from_prefix("/d/p31t0eos/p31t0_train") == ("unknown", "p31t0")
    assert names_from_prefix("/d/xp3_validation_nso") == ("nso", "xp3")
    assert names_from_prefix("/d/train") == ("unknown", "unknown")


def test_paired_format_still_opens_and_wins(tmp_path):
    prefix = str(tmp_path / "mine")
    w = PairedDatasetWriter(prefix, np.uint16)
    w.add_pairs([np.array([5, 6])], [np.array([7, 2])], ["fr"], ["t"], [""])
    w.commit()
    assert pair_format(prefix) == "paired" and isinstance(open_pairs(prefix), PairedDataset)


def test_missing_and_mismatched_files_are_one_line_errors(tiny, tmp_path):
    prefix, inputs, targets = tiny
    with pytest.raises(UserError) as e:
        pair_format(str(tmp_path / "nothing"))
    msg = str(e.value)
    assert "\n" not in msg and "nothing_inputs_document.bin" in msg and "nothing_targets_document.idx" in msg
    assert "nothing.pairs.json" in msg and "--output-format megatron-deepspeed" in msg
    os.remove(prefix + "_targets_document.idx")  # half a pair: only that format's missing file is named
    with pytest.raises(UserError, match=r"missing \S+xp3_train_en_targets_document.idx;"):
        pair_format(prefix)
    with pytest.raises(UserError, match="without '_inputs_document'"):
        pair_format(prefix + "_inputs_document")
    bad = str(tmp_path / "bad")
    write_mds(bad, inputs, targets, drop_target=3)
    with pytest.raises(UserError, match="holds 10 documents .* holds 9"):
        open_pairs(bad)


# ---- mixture files -------------------------------------------------------------------------------


def test_bigscience_mixture_files_parse_like_megatron_deepspeed(tiny, tmp_path):
    d = tmp_path
    # Byte for byte the shape of bigscience's xp3capmixnewcodelong_{train,validation}.txt: one line,
    # double-quoted groups separated by one space, entries ', '-separated, then a newline.
    train = d / "xp3_train.txt"
    train.write_bytes(f'"train: 0.3924620202 0:0.950 {d}/xp3_en, 0.0797519865 0:0.950 {d}/xp3_es, '
                      f'0.001138717 0:1 {d}/xp3_code"\n'.encode())
    valid = d / "xp3_validation.txt"
    valid.write_bytes(f'"validation_en: 1 0.950:1 {d}/xp3_en" "validation_es: 1 0.950:1.0 {d}/xp3_es" '
                      f'"validation_code: 0.5 0.950:1 {d}/xp3_code, 0.5 0:1 {d}/xp3_train_code"\n'.encode())
    for path, option, n_groups in ((train, "--train-weighted-split-paths", 1), (valid, "--valid-weighted-split-paths", 3)):
        ours = parse_weighted_split_paths(read_weighted_split_paths_file(str(path), option + "-path"), option)
        names, weights, splits, paths = mds_parse_paths_path(str(path))
        assert len(ours) == n_groups and [g.name for g in ours] == names
        for g, w, s, p in zip(ours, weights, splits, paths):
            assert [e.prefix for e in g.entries] == p
            assert [e.weight for e in g.entries] == [float(x) for x in w]
            assert [(e.start, e.end) for e in g.entries] == [tuple(float(v) for v in x.split(":")) for x in s]
    # The same groups inline (one argv element per group), as the slurm scripts could pass them.
    inline = [f"validation_en: 1 0.950:1 {d}/xp3_en", f"validation_es: 1 0.950:1.0 {d}/xp3_es"]
    assert [g.name for g in parse_weighted_split_paths(inline)] == mds_parse_paths(inline)[0]
    # Our older one-group-per-line files still read.
    (d / "lines.txt").write_text(f"# comment\nv1: 1 0:1 {d}/a\n'v2: 1 0:1 {d}/b'\n")
    assert [g.split(":")[0] for g in read_weighted_split_paths_file(str(d / "lines.txt"), "-")] == ["v1", "v2"]


def test_every_mixture_file_we_write_parses_with_megatron_deepspeed(tiny, tmp_path):
    text = weighted_split_paths_file_text([weighted_split_group_text("valid_en", [(0.25, "0.9:1", "/a/xp3_en")]),
                                           weighted_split_group_text("valid_fr", [(1 / 3, "0.9:1", "/a/xp3_fr")])])
    (tmp_path / "w.txt").write_text(text)
    assert mds_parse_paths_path(str(tmp_path / "w.txt")) == (
        ["valid_en", "valid_fr"], [["0.25"], ["0.3333333333"]], [["0.9:1"], ["0.9:1"]], [["/a/xp3_en"], ["/a/xp3_fr"]])
    with pytest.raises(ValueError, match="comma"):
        weighted_split_group_text("train", [(1, "0:1", "/a,b")])
    # data_tools/language_weights.py --mixture-file, on a two-file prefix and a LANG COUNT pair.
    prefix = tiny[0]
    out = tmp_path / "lw.txt"
    p = subprocess.run([sys.executable, "data_tools/language_weights.py", prefix, "fr", "100", "--prefix-template",
                        str(tmp_path / "xp3_train_{lang}"), "--mixture-file", str(out), "--alpha", "1"],
                       capture_output=True, text=True, cwd=REPO)
    assert p.returncode == 0, p.stderr
    names, weights, splits, paths = mds_parse_paths_path(str(out))
    total = sum(len(x) for x in tiny[1]) + sum(len(x) for x in tiny[2])
    assert names == ["train"] and paths == [[prefix, str(tmp_path / "xp3_train_fr")]] and splits == [["0:1", "0:1"]]
    assert np.allclose([float(w) for w in weights[0]], [total / (total + 100), 100 / (total + 100)])


# ---- packing -------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [1234, 7])
def test_packing_matches_decoder_packed_mtf_dataset(tiny, seed):
    prefix, inputs, targets = tiny
    pairs = open_pairs(prefix, pad_id=3)
    seq, num = 12, 9
    in_sizes, tg_sizes = pairs.input_sizes, pairs.target_sizes
    ref_rows, ref_epochs = reference_rows(in_sizes, tg_sizes, 0, num, seq, seed)
    rows = MTFPackedRows(pairs, 0, len(pairs), num, seq, seed, name="t")
    assert rows.epochs == ref_epochs >= 3 and len(rows) == len(ref_rows) > num
    for k, ids in enumerate(ref_rows):
        assert rows.pair_ids(k).tolist() == ids and 4 not in ids  # pair 4 (11 + 4 > 13 tokens) is never packed
        got, want = rows[k], reference_batch(inputs, targets, ids, seq, pad=3)
        for key, value in want.items():
            assert got[key].tolist() == pytest.approx(value), (k, key)
        assert got["tokens"].shape == (seq,) and rows.counts(k) == (sum(len(targets[i]) for i in ids), len(ids))
    assert rows.stats.skipped_overlong == rows.epochs and rows.stats.rows == len(rows)
    # A row continues across the epoch boundary: some row holds the same pair id twice or spans epochs.
    spans = [(s // len(pairs), (e - 1) // len(pairs)) for s, e in rows.sample_index]
    assert any(a != b for a, b in spans)
    other = MTFPackedRows(pairs, 0, len(pairs), num, seq, seed + 1)
    assert [other.pair_ids(k).tolist() for k in range(3)] != ref_rows[:3]


def test_packing_of_a_range_reads_that_range(tiny):
    prefix, inputs, targets = tiny
    pairs = open_pairs(prefix, pad_id=0)
    rows = MTFPackedRows(pairs, 5, 10, 4, 12, 42)
    ref_rows, _ = reference_rows(pairs.input_sizes[5:], pairs.target_sizes[5:], 5, 4, 12, 42)
    assert [rows.pair_ids(k).tolist() for k in range(len(rows))] == ref_rows
    assert {i for r in ref_rows for i in r} <= set(range(5, 10))
    with pytest.raises(ValueError, match="no pair"):
        MTFPackedRows(pairs, 4, 5, 2, 12, 42)  # only the overlong pair


def test_paired_and_two_file_datasets_build_the_same_mtf_rows(tiny, tmp_path):
    prefix, inputs, targets = tiny
    mine = str(tmp_path / "mine")
    w = PairedDatasetWriter(mine, np.uint16, {"pad_id": 3})
    w.add_pairs([np.array(x) for x in inputs], [np.array(y) for y in targets], ["en"] * 10, ["xp3"] * 10, [""] * 10)
    w.commit()
    a = MTFPackedRows(open_pairs(prefix, pad_id=3), 0, 10, 6, 12, 5)
    b = MTFPackedRows(open_pairs(mine), 0, 10, 6, 12, 5)
    assert len(a) == len(b) and all(np.array_equal(a[k]["tokens"], b[k]["tokens"]) for k in range(len(a)))


# ---- preprocess_xp3 --output-format megatron-deepspeed -------------------------------------------


def test_preprocess_writes_megatron_deepspeed_files_byte_for_byte(tmp_path):
    from megatron_bloom.data.tokenizer import load_tokenizer

    rows = {"en": [("Translate to French: the cat", "le chat"), ("Is 3 > 2?", "yes")],
            "fr": [("Traduire: le chien", "the dog"), ("Question: deux plus deux", "quatre"), ("Oui?", "")]}
    corpus = tmp_path / "tok.jsonl"
    corpus.write_text("".join(json.dumps({"text": a + " " + b}) + "\n" for r in rows.values() for a, b in r) * 20)
    run = lambda *a: subprocess.run([sys.executable, *a], capture_output=True, text=True, cwd=REPO)  # noqa: E731
    p = run("data_tools/train_tokenizer.py", "--input", str(corpus), "--vocab-size", "300", "--output-dir", str(tmp_path / "tok"))
    assert p.returncode == 0, p.stderr
    for lang, pairs in rows.items():
        (tmp_path / "in" / lang).mkdir(parents=True)
        (tmp_path / "in" / lang / "task.jsonl").write_text(
            "".join(json.dumps({"inputs": a, "targets": b}) + "\n" for a, b in pairs))
    out = str(tmp_path / "out" / "xp3")
    p = run("data_tools/preprocess_xp3.py", "--input", str(tmp_path / "in"), "--output-prefix", out,
            "--tokenizer-name-or-path", str(tmp_path / "tok"), "--prepend-space", "--split-by", "language",
            "--output-format", "megatron-deepspeed")
    assert p.returncode == 0, p.stderr
    tok = load_tokenizer(str(tmp_path / "tok"))
    for lang, pairs in rows.items():
        # What preprocess_data.py writes: inputs as they are; targets with a space before and EOD after.
        for key, seqs in (("inputs", [tok.encode(a) for a, _ in pairs]),
                          ("targets", [tok.encode(" " + b) + [tok.eod_id] for _, b in pairs])):
            bin_bytes, idx_bytes = mmidx_bytes(seqs)
            with open(f"{out}_{lang}_{key}_document.bin", "rb") as f:
                assert f.read() == bin_bytes, (lang, key)
            with open(f"{out}_{lang}_{key}_document.idx", "rb") as f:
                assert f.read() == idx_bytes, (lang, key)
        assert not os.path.exists(f"{out}_{lang}.bin") and not os.path.exists(f"{out}_{lang}_inputs_document.bin.tmp")
    names, weights, splits, paths = mds_parse_paths_path(out + ".mixture.txt")
    assert names == ["train"] and paths == [[f"{out}_en", f"{out}_fr"]] and splits == [["0:1", "0:1"]]
    assert [float(w) for w in weights[0]] == pytest.approx([0.4, 0.6])
    p = run("data_tools/preprocess_xp3.py", "--input", str(tmp_path / "in"), "--output-prefix", out,
            "--tokenizer-name-or-path", str(tmp_path / "tok"), "--prepend-space", "--split-by", "language",
            "--mixture-per-group", "--mixture-name", "validation", "--mixture-range", "0.5:1")
    assert p.returncode == 0, p.stderr
    names, weights, splits, paths = mds_parse_paths_path(out + ".mixture.txt")  # the paired-format run's file
    assert names == ["validation_en", "validation_fr"] and splits == [["0.5:1"], ["0.5:1"]]
    assert pair_format(f"{out}_en") == "paired"  # both formats now exist side by side: ours is read


def test_packing_follows_the_format_unless_asked(tiny, tmp_path):
    from types import SimpleNamespace

    from megatron_bloom.data.finetune import packing_mode
    from megatron_bloom.data.packing import PackedRows

    mds = open_pairs(tiny[0], pad_id=3)
    mine = str(tmp_path / "mine")
    w = PairedDatasetWriter(mine, np.uint16)
    w.add_pairs([np.array([5, 6])], [np.array([7, 2])], ["fr"], ["t"], [""])
    w.commit()
    cfg = lambda mode: SimpleNamespace(finetune=SimpleNamespace(packing=mode))  # noqa: E731
    assert packing_mode(SimpleNamespace(finetune=SimpleNamespace()), mds) == "mtf"  # no such flag yet: auto
    assert packing_mode(cfg("auto"), open_pairs(mine)) == "best-fit"
    assert packing_mode(cfg("best-fit"), mds) == "best-fit" and packing_mode(cfg("mtf"), open_pairs(mine)) == "mtf"
    with pytest.raises(UserError):
        packing_mode(cfg("greedy"), mds)
    rows = PackedRows(mds, 0, 10, 4, 12, [1, 0], "truncate")  # best-fit reads the two-file format too
    assert rows.stats.truncated == 1 and sum(rows.counts(k)[1] for k in range(len(rows))) >= 10
