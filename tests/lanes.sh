#!/usr/bin/env bash
# `make test`: the suite in five pytest processes at once on a 2-core machine. The suite is
# CPU-bound there (Ray's process start-ups, mostly), so its time is its CPU time over two cores
# as long as both stay busy; a lane left alone at the end runs one chain of processes and leaves
# a core idle, hence the unit tests in two lanes.
#   jobs      the Ray Train job tests (test_train_job, test_train_interrupt), on a Ray head of
#             their own;
#   rest      the other integration tests, on another Ray head (each pytest process starts its
#             session's head once: the fault tests kill workers of their own head only);
#   node-loss the node-loss test, which starts a two-node cluster of its own;
#   unit      tests/unit but the bench scripts' tests, and
#   bench     the bench scripts' tests (each runs scripts as subprocesses) and tests/infra, both
#             at the lowest CPU priority (nice 19; Ray's own workers run at 15): the Ray tests,
#             whose waits have deadlines, come first.
# Each lane's report is printed when all have ended; the suite passes when every lane does.
set -u
python="$1"
# One intra-op thread per process: the lanes keep both cores busy, where a second OpenMP
# thread mostly spins at a barrier waiting for its partner to be scheduled (bench/HISTORY.md,
# session 31).
export OMP_NUM_THREADS=1
integration=tests/integration
jobs=("$integration/test_train_job.py" "$integration/test_train_interrupt.py")
node_loss="$integration/test_node_loss.py"
bench_scripts=(tests/unit/test_bench_*.py)
ignored=()
for f in "${jobs[@]}" "$node_loss"; do ignored+=("--ignore=$f"); done
unit_ignored=()
for f in "${bench_scripts[@]}"; do unit_ignored+=("--ignore=$f"); done

declare -A lanes=(
    [jobs]="$python -m pytest -q ${jobs[*]}"
    [rest]="$python -m pytest -q $integration ${ignored[*]}"
    [node-loss]="$python -m pytest -q $node_loss"
    [unit]="nice -n 19 $python -m pytest -q tests/unit ${unit_ignored[*]}"
    [bench]="nice -n 19 $python -m pytest -q ${bench_scripts[*]} tests/infra"
)
order=(jobs rest node-loss unit bench)
declare -A pids
for lane in "${order[@]}"; do
    ${lanes[$lane]} > ".test-$lane.log" 2>&1 &
    pids[$lane]=$!
done
failed=()
for lane in "${order[@]}"; do
    wait "${pids[$lane]}" || failed+=("$lane")
done
for lane in "${order[@]}"; do
    echo; echo "== $lane: ${lanes[$lane]#"$python -m "}"; cat ".test-$lane.log"
done
if [ ${#failed[@]} -gt 0 ]; then
    echo; echo "failed lanes: ${failed[*]}"
    exit 1
fi
