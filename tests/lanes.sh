#!/usr/bin/env bash
# `make test`: the suite in four pytest processes at once on a 2-core machine, because the
# integration tests spend much of their time waiting on Ray (process start-ups, health checks,
# a stall timeout) rather than computing:
#   jobs      the Ray Train job tests (test_train_job, test_train_interrupt), on a Ray head of
#             their own;
#   rest      the other integration tests, on another Ray head (each pytest process starts its
#             session's head once: the fault tests kill workers of their own head only);
#   node-loss the node-loss test, which starts a two-node cluster of its own;
#   unit      tests/unit and tests/infra at the lowest CPU priority (nice 19; Ray's own workers
#             run at 15), filling the others' waits.
# Each lane's report is printed when all have ended; the suite passes when every lane does.
set -u
python="$1"
integration=tests/integration
jobs=("$integration/test_train_job.py" "$integration/test_train_interrupt.py")
node_loss="$integration/test_node_loss.py"
ignored=()
for f in "${jobs[@]}" "$node_loss"; do ignored+=("--ignore=$f"); done

declare -A lanes=(
    [jobs]="$python -m pytest -q ${jobs[*]}"
    [rest]="$python -m pytest -q $integration ${ignored[*]}"
    [node-loss]="$python -m pytest -q $node_loss"
    [unit]="nice -n 19 $python -m pytest -q tests/unit tests/infra"
)
order=(jobs rest node-loss unit)
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
