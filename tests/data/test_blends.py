"""Blends: --data-path parsing, Megatron's greedy order (exactly), weighted-split-path groups."""
import numpy as np
import pytest

from megatron_bloom.data.blends import (
    BlendedDataset,
    BuildOptions,
    blend_num_samples,
    build_blending_indices,
    build_group_dataset,
    build_train_valid_test_datasets,
    build_valid_group_datasets,
    parse_data_path,
    parse_weighted_split_paths,
)
from megatron_bloom.data.gpt_dataset import GPTDataset
from megatron_bloom.data.indexed_dataset import MMapIndexedDatasetBuilder


def reference_greedy(weights, size):
    """helpers.cpp build_blending_indices, written out sequentially as the spec."""
    w = np.asarray(weights, dtype=np.float64)
    w = w / np.sum(w)
    counts = [0] * len(w)
    index, sample = np.empty(size, np.int64), np.empty(size, np.int64)
    for k in range(size):
        step = max(float(k), 1.0)
        best, best_err = 0, w[0] * step - counts[0]
        for i in range(1, len(w)):
            err = w[i] * step - counts[i]
            if err > best_err:
                best, best_err = i, err
        index[k], sample[k] = best, counts[best]
        counts[best] += 1
    return index, sample


WEIGHT_SETS = [
    [1.0],
    [0.3, 0.7],
    [1, 1, 1, 1, 1, 1, 1],  # exact ties every step: lowest index must win, as in the C++
    [0.5] + [0.5 / 45] * 45,  # one big dataset and many equal small ones
    [1e-3, 1 - 1e-3],
    list(np.random.default_rng(0).random(12) ** 3),
    list(np.random.default_rng(1).random(46)),
]


@pytest.mark.parametrize("weights", WEIGHT_SETS, ids=lambda w: f"{len(w)}datasets")
def test_blending_equals_megatron_greedy_exactly(weights):
    size = 6000
    # Small blocks force many blocks and rerun rounds, the part most likely to go wrong.
    for block in (None, 50):
        index, sample = build_blending_indices(weights, size, block=block)
        ref_index, ref_sample = reference_greedy(weights, size)
        np.testing.assert_array_equal(index, ref_index)
        np.testing.assert_array_equal(sample, ref_sample)


@pytest.mark.parametrize("weights", WEIGHT_SETS, ids=lambda w: f"{len(w)}datasets")
def test_blend_follows_weights_at_every_prefix(weights):
    size = 100_000
    index, sample = build_blending_indices(weights, size)
    w = np.asarray(weights) / np.sum(weights)
    onehot = np.zeros((size, len(w)))
    onehot[np.arange(size), index] = 1
    counts = np.cumsum(onehot, axis=0)
    prefix = np.arange(1, size + 1)[:, None]
    # Stated bound: after any k samples every dataset's count is within 2 samples of w * k, i.e.
    # its realized fraction within 2/k of its weight. (The greedy keeps it under 1 for most
    # weights; measured worst over random weight sets up to 100 datasets was 1.67.)
    assert np.abs(counts - w * prefix).max() < 2.0
    # Within a dataset, samples are taken in order 0, 1, 2, ... with no gap or repeat.
    for i in range(len(w)):
        np.testing.assert_array_equal(sample[index == i], np.arange(int(counts[-1, i])))


def test_megatron_component_sizes_always_suffice():
    for weights in WEIGHT_SETS:
        for size in (1, 7, 1000, 33_333):
            index, _ = build_blending_indices(weights, size)
            taken = np.bincount(index, minlength=len(weights))
            assert np.all(taken <= blend_num_samples(np.asarray(weights) / np.sum(weights), size))


class _Range:
    def __init__(self, tag, n):
        self.tag, self.n = tag, n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if not 0 <= i < self.n:
            raise IndexError(i)
        return (self.tag, i)


def test_blended_dataset_maps_samples_and_checks_component_sizes():
    weights = [2.0, 1.0, 1.0]
    sizes = blend_num_samples(np.asarray(weights) / 4, 400)
    blend = BlendedDataset([_Range(t, n) for t, n in zip("abc", sizes)], weights, 400)
    got = [blend[k] for k in range(len(blend))]
    assert len(got) == 400 and [t for t, _ in got].count("a") == 200
    with pytest.raises(ValueError, match="blend_num_samples"):
        BlendedDataset([_Range("a", 10), _Range("b", 1000)], [0.5, 0.5], 400)


# --- --data-path -----------------------------------------------------------------------------------


def test_parse_data_path_forms():
    assert parse_data_path("data/en_text_document") == (["data/en_text_document"], [1.0])
    prefixes, weights = parse_data_path(["0.3", "data/en", "0.1 data/fr"])  # list or one string
    assert prefixes == ["data/en", "data/fr"] and weights == pytest.approx([0.75, 0.25])


@pytest.mark.parametrize(
    "value, message",
    [
        ("0.3 en 0.7", r"weight '0.7' \(token 3\) has no prefix"),
        ("0.3 en abc fr", r"'abc' \(token 3\) should be a weight but is not a number"),
        ("en 0.3 fr", r"'en' \(token 1\) should be a weight"),
        ("0.5", "has no prefix"),
        ("0 en 1 fr", "must be > 0"),
        ("", "empty"),
    ],
)
def test_parse_data_path_errors_are_one_line_and_name_the_token(value, message):
    with pytest.raises(ValueError, match=message) as err:
        parse_data_path(value)
    assert "\n" not in str(err.value)


# --- weighted split paths --------------------------------------------------------------------------


def test_parse_weighted_split_paths_groups():
    train = parse_weighted_split_paths("TRAIN: 0.6 0:0.95 data/en, 0.4 0:0.95 data/fr", "--train-weighted-split-paths")
    assert [g.name for g in train] == ["TRAIN"]
    (g,) = train
    assert g.prefixes == ["data/en", "data/fr"] and g.weights == pytest.approx([0.6, 0.4])
    assert (g.entries[0].start, g.entries[0].end) == (0.0, 0.95)
    assert g.entries[0].document_range(1000) == (0, 950)
    valid = parse_weighted_split_paths(["VALID_EN: 1 0.95:1 data/en", "VALID_FR: 1 0.95:1 data/fr"])
    assert {g.name: g.prefixes for g in valid} == {"VALID_EN": ["data/en"], "VALID_FR": ["data/fr"]}


@pytest.mark.parametrize(
    "values, message",
    [
        ("0.6 0:0.95 data/en", "does not start with 'NAME:'"),
        ("data/en", "has no 'NAME:'"),
        ("T: 0.6 0:0.95", "has 2 fields"),
        ("T: 0.6 0:0.95 data/en extra", "has 4 fields"),
        ("T: x 0:0.95 data/en", "weight 'x' is not a number"),
        ("T: 0.5 0.9:0.1 data/en", "needs 0 <= START < END <= 1"),
        ("T: 0.5 0:1.5 data/en", "needs 0 <= START < END <= 1"),
        ("T: 0.5 0-0.9 data/en", "is not START:END"),
        ("T: 0.5 0:0.9 data/en,", "has 0 fields"),
        (["V: 1 0:1 a", "V: 1 0:1 b"], "used twice"),
        ([], "without a group"),
    ],
)
def test_weighted_split_path_errors(values, message):
    with pytest.raises(ValueError, match=message) as err:
        parse_weighted_split_paths(values)
    assert "\n" not in str(err.value)


def test_train_flag_takes_one_group():
    with pytest.raises(ValueError, match="exactly one group"):
        parse_weighted_split_paths(["A: 1 0:1 a", "B: 1 0:1 b"], "--train-weighted-split-paths")


# --- builders on real files ------------------------------------------------------------------------


def _corpus(tmp_path, name, docs, length, base):
    prefix = str(tmp_path / name)
    builder = MMapIndexedDatasetBuilder(prefix + ".bin", dtype=np.int32)
    for d in range(docs):
        builder.add_item(np.full(length, base + d, dtype=np.int32))
        builder.end_document()
    builder.finalize(prefix + ".idx")
    return prefix


def test_data_path_builds_blended_splits(tmp_path):
    en = _corpus(tmp_path, "en", 100, 50, base=0)
    fr = _corpus(tmp_path, "fr", 100, 50, base=10_000)
    opts = BuildOptions(seq_length=32, seed=1)
    train, valid, test = build_train_valid_test_datasets(f"3 {en} 1 {fr}", "90,10,0", [400, 40, 0], opts)
    assert test is None
    assert isinstance(train, BlendedDataset) and len(train) == 400
    from_fr = np.mean([train[k]["text"][0] >= 10_000 for k in range(400)])
    assert from_fr == pytest.approx(0.25, abs=1 / 400)
    # Valid samples only come from valid documents (ids 90-99 of each corpus).
    for k in range(len(valid)):
        assert np.all(valid[k]["text"] % 10_000 >= 90)
    (single, _, _) = build_train_valid_test_datasets(en, "90,10,0", [100, 10, 0], opts)
    assert isinstance(single, GPTDataset)


def test_validation_groups_are_built_and_named_separately(tmp_path):
    en = _corpus(tmp_path, "en", 100, 40, base=0)
    fr = _corpus(tmp_path, "fr", 100, 40, base=10_000)
    opts = BuildOptions(seq_length=16, seed=2)
    (train_group,) = parse_weighted_split_paths(f"TRAIN: 0.5 0:0.9 {en}, 0.5 0:0.9 {fr}", "--train-weighted-split-paths")
    train = build_group_dataset(train_group, 300, opts)
    assert all(train[k]["text"][0] % 10_000 < 90 for k in range(300))
    groups = parse_weighted_split_paths([f"VALID_EN: 1 0.9:1 {en}", f"VALID_FR: 1 0.9:1 {fr}"])
    valid = build_valid_group_datasets(groups, 20, opts)
    assert list(valid) == ["VALID_EN", "VALID_FR"]
    assert all(valid["VALID_EN"][k]["text"][0] < 10_000 for k in range(20))
    assert all(valid["VALID_FR"][k]["text"][0] >= 10_090 for k in range(20))


# --- data_tools/language_weights.py ----------------------------------------------------------------


def test_alpha_weights_formula_and_cli_output_is_a_data_path(tmp_path, capsys):
    from data_tools import language_weights as lw

    counts = [1_200, 400, 2]
    w = lw.alpha_weights(counts, 0.3)
    q = (np.array(counts) / 1602) ** 0.3
    np.testing.assert_allclose(w, q / q.sum())
    np.testing.assert_allclose(lw.alpha_weights(counts, 1.0), np.array(counts) / 1602)  # alpha=1: proportional
    assert w[2] > 2 / 1602  # alpha < 1 upsamples the small language
    en = _corpus(tmp_path, "en", 30, 40, base=0)  # 1200 tokens read from the .idx sizes
    with pytest.raises(SystemExit) as done:  # main is the command's entry point: it exits
        lw.main([en, "fr", "400", "yo", "2", "--prefix-template", "data/{lang}"])
    assert done.value.code == 0
    prefixes, weights = parse_data_path(capsys.readouterr().out.strip().splitlines()[-1])
    assert prefixes == [en, "data/fr", "data/yo"]
    np.testing.assert_allclose(weights, w, rtol=1e-5)  # printed with 6 significant digits
    with pytest.raises(SystemExit) as done:
        lw.main(["en", "12", "3"])
    assert done.value.code == 2
    assert "follows no language name" in capsys.readouterr().err
