"""The node-loss guards without a cluster: the capacity arithmetic on resource dicts, and the
stall guard on slow generators."""

from __future__ import annotations

import threading
import time

import pytest

from pipeline.config import ClusterConfig, ConfigError, build_config
from pipeline.distributed.capacity import (
    CapacityError,
    InputStalledError,
    Need,
    check_capacity,
    guard_stalls,
)

TWO_NODES = [{"CPU": 2.0}, {"CPU": 2.0}]


def _need(**cluster) -> Need:
    return Need.of(ClusterConfig(**cluster), use_gpu=False)


def test_workers_plus_data_cpus_that_fit_pass():
    check_capacity(_need(num_workers=2, cpus_per_worker=1.0), TWO_NODES, "before training")
    check_capacity(_need(num_workers=2, cpus_per_worker=0.5), [{"CPU": 2.0}], "before training")


def test_a_lost_node_names_the_numbers():
    """The finding: two 1-CPU workers restarted on the 2-CPU head leave Ray Data nothing."""
    with pytest.raises(CapacityError) as err:
        check_capacity(_need(num_workers=2, cpus_per_worker=1.0), [{"CPU": 2.0}], "at restart")
    assert str(err.value) == (
        "at restart: the cluster has 2 CPUs on 1 node; 2 Train workers x 1 CPU + 1 CPU for "
        "Ray Data input (cluster.data_cpus) need 3 (a lost node?): lower cluster.num_workers "
        "/ cluster.cpus_per_worker or add nodes"
    )
    assert "\n" not in str(err.value)  # the driver prints the last line of a worker's error


def test_data_cpus_count():
    need = _need(num_workers=2, cpus_per_worker=1.0, data_cpus=3.0)
    assert need.cpus == 5.0
    with pytest.raises(CapacityError, match="need 5"):
        check_capacity(need, TWO_NODES, "before training")


def test_a_worker_must_fit_on_one_node():
    with pytest.raises(CapacityError, match="only 2 of 3 workers can be placed"):
        nodes = [*TWO_NODES, {"CPU": 1.0}, {"CPU": 1.0}]  # 6 CPUs, but no node holds two
        check_capacity(_need(num_workers=3, cpus_per_worker=1.5), nodes, "x")


def test_gpus_are_counted_when_used():
    need = Need.of(ClusterConfig(num_workers=2), use_gpu=True)
    check_capacity(need, [{"CPU": 8.0, "GPU": 1.0}, {"CPU": 8.0, "GPU": 1.0}], "x")
    with pytest.raises(CapacityError, match="need 2 GPUs"):
        check_capacity(need, [{"CPU": 8.0, "GPU": 1.0}], "x")
    with pytest.raises(CapacityError, match="only 1 of 2 workers"):
        check_capacity(need, [{"CPU": 1.0, "GPU": 2.0}, {"CPU": 2.0}], "x")


def test_fractional_cpus_do_not_trip_on_rounding():
    check_capacity(_need(num_workers=3, cpus_per_worker=0.1, data_cpus=1.0), [{"CPU": 1.3}], "x")


def test_the_keys_are_validated_and_execution_settings():
    cfg = build_config({}, ["cluster.stall_timeout_s=60", "cluster.data_cpus=2"])
    assert cfg.cluster.stall_timeout_s == 60 and cfg.cluster.data_cpus == 2
    assert "cluster.stall_timeout_s" not in cfg.recipe() and "cluster.data_cpus" not in cfg.recipe()
    with pytest.raises(ConfigError, match="cluster.stall_timeout_s"):
        build_config({}, ["cluster.stall_timeout_s=3600"])
    with pytest.raises(ConfigError, match="cluster.data_cpus"):
        build_config({}, ["cluster.data_cpus=0.5"])


def _slow(delays: list[float]):
    for i, delay in enumerate(delays):
        time.sleep(delay)
        yield i


def test_batches_in_time_pass_through_in_order():
    assert list(guard_stalls(_slow([0.0, 0.1, 0.0]), 1.0, "epoch 1")) == [0, 1, 2]


def test_a_stalled_input_fails_naming_the_stall():
    released = threading.Event()

    def stalling():
        yield from (0, 1)
        released.wait(30)  # Ray Data with no CPU to run on
        yield 2

    started = time.monotonic()
    got = []
    with pytest.raises(InputStalledError) as err:
        for batch in guard_stalls(stalling(), 1.0, "epoch 3", lambda: "2 CPUs"):
            got.append(batch)
    released.set()
    assert got == [0, 1]
    assert time.monotonic() - started < 5
    assert str(err.value) == (
        "input stalled: no training batch for 1 s in epoch 3 (after 2 batches; "
        "cluster.stall_timeout_s): Ray Data has no resources to run its tasks (a lost node?); "
        "2 CPUs"
    )


def test_the_consumers_own_time_is_not_counted():
    """A training step slower than the timeout is not a stall: only the wait is timed."""
    seen = []
    for batch in guard_stalls(_slow([0.0, 0.0, 0.0]), 0.5, "epoch 1"):
        time.sleep(0.8)
        seen.append(batch)
    assert seen == [0, 1, 2]


def test_an_error_of_the_input_is_raised_in_the_consumer():
    def broken():
        yield 1
        raise ValueError("shard 3 is truncated")

    with pytest.raises(ValueError, match="shard 3 is truncated"):
        list(guard_stalls(broken(), 1.0, "epoch 1"))


def test_stopping_early_stops_the_reader():
    pulled = []

    def endless():
        i = 0
        while True:
            pulled.append(i)
            yield i
            i += 1

    guarded = guard_stalls(endless(), 1.0, "epoch 1")
    assert next(guarded) == 0
    guarded.close()
    time.sleep(0.5)
    count = len(pulled)
    time.sleep(0.5)
    assert len(pulled) == count <= 3  # one batch ahead at most, then the reader stopped


def test_waiting_for_capacity_passes_when_nodes_join(monkeypatch):
    from pipeline.distributed import capacity

    seen = iter([[{"CPU": 2.0}], [{"CPU": 2.0}], TWO_NODES])  # an autoscaler adds a node
    monkeypatch.setattr(capacity, "live_nodes", lambda: next(seen))
    said: list[str] = []
    cluster = ClusterConfig(num_workers=2, cpus_per_worker=1.0, stall_timeout_s=10)
    capacity.wait_for_capacity(cluster, False, "before training", said.append, poll_s=0.01)
    assert len(said) == 1 and said[0].endswith("waiting up to 10 s for nodes to join")


def test_waiting_for_capacity_is_bounded(monkeypatch):
    from pipeline.distributed import capacity

    monkeypatch.setattr(capacity, "live_nodes", lambda: [{"CPU": 2.0}])
    cluster = ClusterConfig(num_workers=2, cpus_per_worker=1.0, stall_timeout_s=0.2)
    with pytest.raises(CapacityError, match=r"need 3 .*\(waited 0.2 s for nodes to join"):
        capacity.wait_for_capacity(cluster, False, "at worker-group start", poll_s=0.05)
