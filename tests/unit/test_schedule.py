import math

import pytest

from pipeline.config import load_config
from pipeline.training.schedule import lr_at, stage_of

OPTIM = load_config(None).optim  # defaults = the paper recipe


@pytest.mark.parametrize(
    "epoch, expected",
    [
        (0, 0.025),  # warm-up: 0.05 + 0.025 * (e - 1)
        (4, 0.125),
        (5, 0.15),  # peak, start of the cosine
        (100, 0.075 * (1 + math.cos(math.pi * 95 / 175))),
        (179, 0.075 * (1 + math.cos(math.pi * 174 / 175))),  # ~1.2e-5
        (180, 0.0375),  # stage 2 restarts: 0.05 + 0.0125 * (k - 1)
        (184, 0.0875),
        (185, 0.10),
        (199, 0.05 * (1 + math.cos(math.pi * 14 / 15))),  # ~0.0011
    ],
)
def test_lr_matches_the_released_schedule(epoch, expected):
    assert lr_at(epoch, OPTIM) == pytest.approx(expected, rel=1e-12)


def test_documented_endpoints():
    assert lr_at(179, OPTIM) == pytest.approx(1.2e-5, abs=1e-6)
    assert lr_at(199, OPTIM) == pytest.approx(0.0011, abs=1e-4)


def test_stage_switch_at_180():
    assert [stage_of(e, OPTIM) for e in (0, 179, 180, 199)] == [1, 1, 2, 2]
