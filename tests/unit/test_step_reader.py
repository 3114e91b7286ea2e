"""training/data.StepReader: reading ahead changes when a step's batches are read, never which."""
import threading

import pytest

from megatron_bloom.training.data import StepReader


def schedule(consumed):
    """A ramp: 4 samples per step until 12 consumed, then 8."""
    return 4 if consumed < 12 else 8


def read(consumed, gbs):
    return [("batch", consumed, gbs, threading.current_thread().name)]


@pytest.mark.parametrize("workers", [0, 1, 2])
def test_same_batches_with_and_without_read_ahead(workers):
    reader = StepReader(read, workers, schedule)
    steps = [(0, 4), (4, 4), (8, 4), (12, 8), (28, 8), (36, 8)]  # (20, 8) skipped: a skip range moved on
    try:
        got = [reader(c, g)[0][:3] for c, g in steps]
    finally:
        reader.close()
    assert got == [("batch", c, g) for c, g in steps]


def test_reads_the_next_steps_in_background_threads():
    calls = []
    done = threading.Event()

    def recording(consumed, gbs):
        calls.append((consumed, gbs, threading.current_thread().name))
        if len(calls) >= 3:
            done.set()
        return [consumed]

    reader = StepReader(recording, 2, schedule)
    try:
        assert reader(0, 4) == [0]
        assert done.wait(10)
        ahead = sorted(c[:2] for c in calls[1:])
        assert ahead == [(4, 4), (8, 4)]  # the two steps after this one, per the schedule
        assert all(name.startswith("step-reader") for _, _, name in calls[1:])
        assert calls[0][2] == threading.current_thread().name  # nothing read ahead yet: read in place
        assert reader(4, 4) == [4] and reader(8, 4) == [8]
        assert len([c for c in calls if c[:2] in ((4, 4), (8, 4))]) == 2  # each read once
    finally:
        reader.close()


def test_a_failed_read_raises_when_its_step_is_due():
    def failing(consumed, gbs):
        if consumed == 4:
            raise ValueError("token id too large in step 2")
        return [consumed]

    reader = StepReader(failing, 2, schedule)
    try:
        assert reader(0, 4) == [0]  # step 2's failure happens in the background, unseen
        with pytest.raises(ValueError, match="step 2"):
            reader(4, 4)
    finally:
        reader.close()
