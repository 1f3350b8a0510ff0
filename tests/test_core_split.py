"""How ingest shares the cores between decoding and the encoder, from each stage's measured cost."""

from __future__ import annotations

import pytest

from imgsearch.ingest.reader import MAX_AUTO_WORKERS, MAX_LANES, CoreSplit, split_cores

COSTS = [(5.5, 4.0), (0.4, 4.0), (1.3, 5.0), (12.0, 2.0), (4.0, 4.0), (1.0, 30.0), (9.1, 30.7)]


def rate(split: CoreSplit, decode_ms: float, encode_ms: float) -> float:
    """Images per ms: lanes that each decode and encode; workers and threads side by side; or, without workers,
    decoding then encoding on every core."""
    if split.lanes > 1:
        return split.lanes / (decode_ms + encode_ms)
    if split.decode_workers == 0:
        return 1 / (decode_ms + encode_ms / split.encoder_threads)
    return min(split.decode_workers / decode_ms, split.encoder_threads / encode_ms)


def busy_threads(split: CoreSplit) -> int:
    return split.decode_workers + split.lanes * split.encoder_threads


def whole_thread_splits(cores: int) -> list[CoreSplit]:
    return [CoreSplit(workers, cores - workers) for workers in range(min(cores, MAX_AUTO_WORKERS + 1))]


@pytest.mark.parametrize("cores", [2, 3, 4, 8, 16, 64])
@pytest.mark.parametrize(("decode_ms", "encode_ms"), COSTS)
def test_the_split_uses_every_core_once_and_no_whole_thread_split_is_faster(cores, decode_ms, encode_ms):
    split = split_cores(cores, decode_ms, encode_ms, pending=10_000, batch_size=32)
    assert busy_threads(split) == cores  # one per core, never more
    assert 0 <= split.decode_workers <= MAX_AUTO_WORKERS and split.encoder_threads >= 1
    assert rate(split, decode_ms, encode_ms) >= max(rate(other, decode_ms, encode_ms) for other in whole_thread_splits(cores))


@pytest.mark.parametrize("cores", range(2, MAX_LANES + 1))
@pytest.mark.parametrize(("decode_ms", "encode_ms"), COSTS)
def test_up_to_max_lanes_cores_each_core_decodes_and_encodes_at_the_machine_bound(cores, decode_ms, encode_ms):
    split = split_cores(cores, decode_ms, encode_ms, pending=10_000, batch_size=32)
    assert split == CoreSplit(0, 1, lanes=cores)
    assert rate(split, decode_ms, encode_ms) == pytest.approx(cores / (decode_ms + encode_ms))


def test_lanes_beat_every_whole_thread_split_where_the_stages_do_not_divide_the_cores():
    # camera JPEGs with fp32 Lite0 on 2 cores (docs/benchmarks.md): the best split, decoding then encoding on both
    # cores, allows 0.81 of what lanes allow
    best = max(rate(other, 9.1, 30.7) for other in whole_thread_splits(2))
    assert best / rate(split_cores(2, 9.1, 30.7, pending=10_000, batch_size=32), 9.1, 30.7) == pytest.approx(0.81, abs=0.01)


def test_on_a_big_machine_costly_decoding_gets_the_cores_and_cheap_decoding_leaves_them_to_the_encoder():
    assert split_cores(16, decode_ms=12.0, encode_ms=4.0, pending=10_000, batch_size=32) == CoreSplit(8, 8)  # workers capped
    assert split_cores(16, decode_ms=6.0, encode_ms=2.0, pending=10_000, batch_size=32) == CoreSplit(8, 8)
    assert split_cores(16, decode_ms=3.0, encode_ms=5.0, pending=10_000, batch_size=32) == CoreSplit(6, 10)  # 6/3 = 2 = 10/5
    assert split_cores(16, decode_ms=0.4, encode_ms=4.0, pending=10_000, batch_size=32) == CoreSplit(2, 14)


def test_a_tie_gives_the_encoder_the_core():
    assert split_cores(16, decode_ms=4.0, encode_ms=4.0, pending=10_000, batch_size=32) == CoreSplit(8, 8)
    assert split_cores(15, decode_ms=4.0, encode_ms=4.0, pending=10_000, batch_size=32) == CoreSplit(7, 8)


def test_small_jobs_and_one_core_decode_in_the_main_process():
    assert split_cores(8, 5.0, 4.0, pending=63, batch_size=32) == CoreSplit(0, 8)
    assert split_cores(1, 5.0, 4.0, pending=10_000, batch_size=32) == CoreSplit(0, 1)


def test_workers_are_capped_and_the_rest_of_a_big_machine_goes_to_the_encoder():
    split = split_cores(64, decode_ms=50.0, encode_ms=1.0, pending=10_000, batch_size=32)
    assert split == CoreSplit(MAX_AUTO_WORKERS, 64 - MAX_AUTO_WORKERS)
