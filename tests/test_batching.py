"""The dynamic batcher: items waiting together become one call, each caller gets its own result or the batch's error."""

from __future__ import annotations

import threading
import time

import pytest

from lookalike.models.batching import DynamicBatcher


class Recorder:
    """A batch function that doubles numbers, records each batch, and can be held until released."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.release = threading.Event()
        self.release.set()
        self.entered = threading.Event()

    def __call__(self, items: list[int]) -> list[int]:
        self.batches.append(list(items))
        self.entered.set()
        assert self.release.wait(10)
        if any(i < 0 for i in items):
            raise ValueError("negative item")
        return [2 * i for i in items]


def test_items_queued_during_a_batch_form_the_next_batch() -> None:
    fn = Recorder()
    b = DynamicBatcher(fn, max_batch=8)
    fn.release.clear()
    first = b.submit(1)
    assert fn.entered.wait(5)  # the worker is busy with [1]
    rest = [b.submit(i) for i in range(2, 7)]
    fn.release.set()
    assert first.result(5) == 2
    assert [f.result(5) for f in rest] == [4, 6, 8, 10, 12]
    assert fn.batches == [[1], [2, 3, 4, 5, 6]]
    assert b.stats.items == 6 and b.stats.batches == 2 and b.stats.largest == 5
    b.close()


def test_max_batch_caps_a_batch_and_one_means_no_batching() -> None:
    for cap, sizes in ((3, [1, 3, 3, 3]), (1, [1] * 10)):
        fn = Recorder()
        b = DynamicBatcher(fn, max_batch=cap)
        fn.release.clear()
        futures = [b.submit(0)]
        assert fn.entered.wait(5)
        futures += [b.submit(i) for i in range(1, 10)]
        fn.release.set()
        assert [f.result(5) for f in futures] == [2 * i for i in range(10)]
        assert [len(x) for x in fn.batches] == sizes
        b.close()


def test_the_window_gathers_items_that_arrive_soon_after_the_first() -> None:
    fn = Recorder()
    b = DynamicBatcher(fn, max_batch=8, window=0.5)
    f1 = b.submit(1)
    time.sleep(0.05)
    f2 = b.submit(2)
    assert (f1.result(5), f2.result(5)) == (2, 4)
    assert fn.batches == [[1, 2]]
    b.close()


def test_a_failing_batch_fails_each_of_its_callers_and_the_worker_goes_on() -> None:
    fn = Recorder()
    b = DynamicBatcher(fn, max_batch=8)
    fn.release.clear()
    blocker = b.submit(5)
    assert fn.entered.wait(5)
    bad = [b.submit(1), b.submit(-1)]
    fn.release.set()
    assert blocker.result(5) == 10
    for f in bad:
        with pytest.raises(ValueError, match="negative item"):
            f.result(5)
    assert b(21, timeout=5) == 42  # the worker survived
    b.close()


def test_many_threads_each_get_their_own_result() -> None:
    b = DynamicBatcher(lambda xs: [x * x for x in xs], max_batch=4)
    out: dict[int, int] = {}

    def call(i: int) -> None:
        out[i] = b(i, timeout=10)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(64)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert out == {i: i * i for i in range(64)}
    assert b.stats.items == 64 and b.stats.largest <= 4
    b.close()


def test_close_finishes_what_was_queued_then_refuses() -> None:
    fn = Recorder()
    b = DynamicBatcher(fn, max_batch=2)
    fn.release.clear()
    futures = [b.submit(i) for i in range(5)]
    assert fn.entered.wait(5)
    fn.release.set()
    b.close()
    assert [f.result(1) for f in futures] == [0, 2, 4, 6, 8]
    with pytest.raises(RuntimeError, match="closed"):
        b.submit(1)


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError):
        DynamicBatcher(lambda xs: xs, max_batch=0)
    with pytest.raises(ValueError):
        DynamicBatcher(lambda xs: xs, window=-1)
