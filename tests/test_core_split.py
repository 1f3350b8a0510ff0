"""How ingest shares the cores between decode workers and the encoder's threads, from each stage's measured cost."""

from __future__ import annotations

import pytest

from imgsearch.ingest.reader import MAX_AUTO_WORKERS, CoreSplit, split_cores


def rate(split: CoreSplit, decode_ms: float, encode_ms: float) -> float:
    """Images per ms: workers and threads side by side, or, without workers, decoding then encoding on every core."""
    if split.decode_workers == 0:
        return 1 / (decode_ms + encode_ms / split.encoder_threads)
    return min(split.decode_workers / decode_ms, split.encoder_threads / encode_ms)


@pytest.mark.parametrize("cores", [2, 3, 4, 8, 16, 64])
@pytest.mark.parametrize(("decode_ms", "encode_ms"), [(5.5, 4.0), (0.4, 4.0), (1.3, 5.0), (12.0, 2.0), (4.0, 4.0), (1.0, 30.0)])
def test_the_split_uses_every_core_once_and_no_other_split_is_faster(cores, decode_ms, encode_ms):
    split = split_cores(cores, decode_ms, encode_ms, pending=10_000, batch_size=32)
    assert split.decode_workers + split.encoder_threads == cores  # busy threads: one per core, never more
    assert 0 <= split.decode_workers <= MAX_AUTO_WORKERS and split.encoder_threads >= 1
    others = [CoreSplit(workers, cores - workers) for workers in range(min(cores, MAX_AUTO_WORKERS + 1))]
    assert rate(split, decode_ms, encode_ms) == max(rate(other, decode_ms, encode_ms) for other in others)


def test_costly_decoding_gets_the_cores_and_cheap_decoding_leaves_them_to_the_encoder():
    camera = split_cores(8, decode_ms=12.0, encode_ms=4.0, pending=10_000, batch_size=32)
    assert camera == CoreSplit(6, 2)  # 6/12 = 0.5 and 2/4 = 0.5 images per ms
    assert split_cores(8, decode_ms=0.4, encode_ms=4.0, pending=10_000, batch_size=32) == CoreSplit(1, 7)
    # small product PNGs on 2 cores: a worker beside a one-thread encoder would idle; decode between passes instead
    assert split_cores(2, decode_ms=1.3, encode_ms=5.0, pending=10_000, batch_size=32) == CoreSplit(0, 2)
    assert split_cores(2, decode_ms=5.8, encode_ms=5.4, pending=10_000, batch_size=32) == CoreSplit(1, 1)  # camera JPEGs


def test_a_tie_gives_the_encoder_the_core():
    assert split_cores(2, decode_ms=4.0, encode_ms=4.0, pending=10_000, batch_size=32) == CoreSplit(1, 1)
    assert split_cores(4, decode_ms=4.0, encode_ms=4.0, pending=10_000, batch_size=32) == CoreSplit(2, 2)
    assert split_cores(3, decode_ms=4.0, encode_ms=4.0, pending=10_000, batch_size=32) == CoreSplit(1, 2)


def test_small_jobs_and_one_core_decode_in_the_main_process():
    assert split_cores(8, 5.0, 4.0, pending=63, batch_size=32) == CoreSplit(0, 8)
    assert split_cores(1, 5.0, 4.0, pending=10_000, batch_size=32) == CoreSplit(0, 1)


def test_workers_are_capped_and_the_rest_of_a_big_machine_goes_to_the_encoder():
    split = split_cores(64, decode_ms=50.0, encode_ms=1.0, pending=10_000, batch_size=32)
    assert split == CoreSplit(MAX_AUTO_WORKERS, 64 - MAX_AUTO_WORKERS)
