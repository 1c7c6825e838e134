"""Node loss: the cluster must hold the Train workers *and* their input, and a stall must end.

After a node loss Ray Train restarts the workers on the nodes left; they can take every CPU
there, and Ray Data ("Cluster resources are not enough ... may hang forever") then feeds them
nothing until its no-progress limit (1,800 s), once per retry. Two guards end that in minutes:

- `check_capacity`: the Train workers' CPUs (and GPUs) plus `cluster.data_cpus` for Ray Data
  must fit the live nodes. The driver checks before `trainer.fit()`; rank 0 checks again at
  every worker-group (re)start, on live totals (`ray.nodes()` drops a lost node), so a group
  restarted on too small a cluster fails instead of starving its own input. Both wait up to
  `cluster.stall_timeout_s` for nodes to join first (`wait_for_capacity`): an autoscaling
  cluster (infra/: KubeRay and AWS scale workers from 0) adds them, and replaces a lost one.
- `guard_stalls`: a worker waiting longer than `cluster.stall_timeout_s` for its next batch
  fails, naming the stall, the epoch and the likely cause. build_trainer sets the same limit
  as Ray Data's own no-progress timeout, which also covers the evaluation reads.

Reserving CPUs for Ray Data (Ray 2.60 source): Train V2 registers its workers with Ray Data's
AutoscalingCoordinator and Ray Data gets what is left. `ExecutionOptions.resource_limits` is a
ceiling, `exclude_resources` (deprecated) subtracts, `op_resource_reservation_*` divide Ray
Data's own budget between its operators: none gives Ray Data a floor beside Train. A placement
group for Ray Data (`DataContext.scheduling_strategy`) lives on one node: lost with it, it is
rescheduled in a race with Train's own group for the same CPUs. Nothing reliable exists, so
the capacity check at every group start and the stall guard do the job.

Elastic training (`ScalingConfig(num_workers=(min, max))`, in Ray 2.60 Train V2): rejected.
The recipe's global batch is kept by a per-worker batch of global // world, so resizing
mid-run changes the per-worker batch, hence BatchNorm's (per-worker) batch statistics, the
rounding of global // world and which rows each rank sees: a resumed run would no longer equal
an uninterrupted one (the checkpoint contract is exact resume; `cluster.num_workers` is part
of the recipe for that reason). Ray's elastic policy also counts fractional CPUs poorly (its
own TODO). A run that lost capacity fails clearly and is relaunched under its run name.
"""

from __future__ import annotations

import math
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

from pipeline.config import ClusterConfig

T = TypeVar("T")

_EPS = 1e-9


class CapacityError(RuntimeError):
    """The live cluster cannot hold the Train workers and Ray Data's input together."""


class InputStalledError(RuntimeError):
    """A worker waited longer than cluster.stall_timeout_s for its next batch."""


@dataclass(frozen=True)
class Need:
    """What one training run needs of the cluster at once."""

    workers: int
    cpus_per_worker: float
    gpus_per_worker: float
    data_cpus: float

    @classmethod
    def of(cls, cluster: ClusterConfig, use_gpu: bool) -> Need:
        gpus = 1.0 if use_gpu else 0.0  # Ray Train gives each worker one GPU (build_trainer)
        return cls(cluster.num_workers, cluster.cpus_per_worker, gpus, cluster.data_cpus)

    @property
    def cpus(self) -> float:
        return self.workers * self.cpus_per_worker + self.data_cpus

    def workers_on(self, node: Mapping[str, float]) -> int:
        """How many workers one node can hold whole."""
        gpu = node.get("GPU", 0.0) / self.gpus_per_worker if self.gpus_per_worker else math.inf
        return math.floor(min(node.get("CPU", 0.0) / self.cpus_per_worker, gpu) + _EPS)


def check_capacity(need: Need, nodes: Sequence[Mapping[str, float]], when: str) -> None:
    """Raise CapacityError (one line, with the numbers) unless `nodes` (each node's total
    resources, e.g. {"CPU": 2.0}) hold the workers plus Ray Data's CPUs: in total, and each
    worker whole on one node. How Ray packs them is not checked: the stall guard covers it."""
    cpus = sum(n.get("CPU", 0.0) for n in nodes)
    gpus = sum(n.get("GPU", 0.0) for n in nodes)
    have = f"{when}: the cluster has {cpus:g} CPUs" + (f" and {gpus:g} GPUs" if gpus else "")
    have += f" on {len(nodes)} node{'s' if len(nodes) != 1 else ''}"
    fix = "lower cluster.num_workers / cluster.cpus_per_worker or add nodes"
    if need.cpus > cpus + _EPS:
        raise CapacityError(
            f"{have}; {need.workers} Train workers x {need.cpus_per_worker:g} CPU + "
            f"{need.data_cpus:g} CPU for Ray Data input (cluster.data_cpus) need "
            f"{need.cpus:g} (a lost node?): {fix}"
        )
    if need.gpus_per_worker and need.workers * need.gpus_per_worker > gpus + _EPS:
        raise CapacityError(
            f"{have}; {need.workers} Train workers x {need.gpus_per_worker:g} GPU need "
            f"{need.workers * need.gpus_per_worker:g} GPUs (a lost node?): lower "
            "cluster.num_workers or add GPU nodes"
        )
    fits = sum(need.workers_on(node) for node in nodes)
    if fits < need.workers:
        raise CapacityError(
            f"{have}; a Train worker needs {need.cpus_per_worker:g} CPU"
            + (f" and {need.gpus_per_worker:g} GPU" if need.gpus_per_worker else "")
            + f" on one node, so only {fits} of {need.workers} workers can be placed: {fix}"
        )


def live_nodes() -> list[dict[str, float]]:
    """Each alive node's total resources (a lost node drops out within seconds)."""
    import ray

    return [dict(n["Resources"]) for n in ray.nodes() if n.get("Alive")]


def started_here() -> bool:
    """Whether this process started its Ray instance (`ray.init()` with no cluster to join):
    such an instance has one node and no autoscaler, so no node will ever join it."""
    from ray._private import worker  # the public API does not tell who started the instance

    return bool(getattr(getattr(worker, "_global_node", None), "head", False))


def wait_for_capacity(
    cluster: ClusterConfig,
    use_gpu: bool,
    when: str,
    say: Callable[[str], object] | None = None,
    poll_s: float = 2.0,
) -> None:
    """`check_capacity` on the live nodes, polled for up to `cluster.stall_timeout_s` while
    it fails (nodes may join); `say` gets the shortfall once, when the wait begins. No wait on
    a Ray instance this process started: the error comes at once."""
    local = started_here()
    deadline = time.monotonic() + cluster.stall_timeout_s
    while True:
        try:
            return check_capacity(Need.of(cluster, use_gpu), live_nodes(), when)
        except CapacityError as exc:
            waited = f"waited {cluster.stall_timeout_s:g} s for nodes to join"
            if local:
                raise CapacityError(
                    f"{exc} (a Ray instance started by this job, on this machine only: "
                    "connect to a cluster with RAY_ADDRESS for more)"
                ) from None
            if time.monotonic() >= deadline:
                raise CapacityError(f"{exc} ({waited}, cluster.stall_timeout_s)") from None
            if say is not None:
                say(f"{exc}; waiting up to {cluster.stall_timeout_s:g} s for nodes to join")
                say = None
        time.sleep(poll_s)


def cluster_summary() -> str:
    """The live cluster in a few words, for a stall's error message."""
    try:
        nodes = live_nodes()
    except Exception:  # the error being reported matters more than this detail
        return "unknown"
    return f"{sum(n.get('CPU', 0.0) for n in nodes):g} CPUs on {len(nodes)} nodes"


_END = object()


def guard_stalls(
    batches: Iterable[T],
    timeout_s: float,
    where: str,
    hint: Callable[[], str] = lambda: "",
) -> Iterator[T]:
    """`batches`, raising InputStalledError when the consumer waits more than `timeout_s` for
    the next one (its own step is not counted). A thread reads one batch ahead so the wait
    can be timed; `where` names the place ("epoch 3"), `hint()` adds detail on a stall."""
    slot: queue.Queue = queue.Queue(maxsize=1)
    stop = threading.Event()

    def offer(item: object) -> bool:
        while not stop.is_set():
            try:
                slot.put(item, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for batch in batches:
                if not offer((batch,)):
                    return
            offer(_END)
        except BaseException as exc:  # handed to the consumer, raised there
            offer(exc)

    threading.Thread(target=produce, name="shike-input-guard", daemon=True).start()
    received = 0
    try:
        while True:
            try:
                item = slot.get(timeout=timeout_s)
            except queue.Empty:
                extra = hint()
                raise InputStalledError(
                    f"input stalled: no training batch for {timeout_s:g} s in {where} "
                    f"(after {received} batches; cluster.stall_timeout_s): Ray Data has no "
                    f"resources to run its tasks (a lost node?)" + (f"; {extra}" if extra else "")
                ) from None
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            received += 1
            yield item[0]
    finally:
        stop.set()
