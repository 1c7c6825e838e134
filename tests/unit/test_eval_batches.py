"""EvalBatches: an evaluation split is read once and replayed from memory when it fits."""

import torch

from pipeline.distributed.worker import EvalBatches


def _source(calls: list[int]):
    def read():
        calls.append(1)
        for k in range(3):
            yield torch.full((4, 3, 2, 2), float(k)), torch.arange(4) + k

    return read


def _passes(batches: EvalBatches, n: int) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    return [list(batches) for _ in range(n)]


def test_small_split_is_read_once_and_replayed_unchanged():
    calls: list[int] = []
    passes = _passes(EvalBatches(_source(calls)), 3)
    assert len(calls) == 1
    for later in passes[1:]:
        assert len(later) == 3
        for (a, la), (b, lb) in zip(passes[0], later, strict=True):
            assert torch.equal(a, b) and torch.equal(la, lb)


def test_split_over_the_cap_is_read_every_time():
    calls: list[int] = []
    one_batch = 4 * 3 * 2 * 2 * 4 + 4 * 8  # float32 images + int64 labels
    passes = _passes(EvalBatches(_source(calls), max_bytes=2 * one_batch), 3)
    assert len(calls) == 3 and all(len(p) == 3 for p in passes)


def test_an_interrupted_pass_keeps_nothing():
    calls: list[int] = []
    batches = EvalBatches(_source(calls))
    next(iter(batches))  # abandoned after one batch
    assert len(list(batches)) == 3 and len(calls) == 2
    assert len(list(batches)) == 3 and len(calls) == 2
