#!/usr/bin/env bash
# One call on a lent GPU machine (PyTorch only; no Ray, no MLflow, no network), from the repo
# root (the bench scripts run as modules: python3 -m bench.NAME):
#   - install the few pure-Python packages the engine needs from carried wheels (.whl/, see
#     BENCHMARKS.md for the pip download line),
#   - run the CUDA tests: the captured step against the eager one (their outcome picks the
#     captured or the eager step) and the on-device augmentation against the CPU's (on a
#     failure the runs augment in the loader instead),
#   - the augmentation benchmark (loader against on-device batches; AUGMENT_BENCH=0 skips it),
#     the JPEG decode tests and benchmark (CPU core against nvJPEG and the workers'
#     data.decode_on=device step; DECODE_BENCH=0 skips the benchmark), and, when
#     asked, the loader (LOADER_BENCH=1) and step (STEP_BENCH=1) benchmarks,
#   - the reproduce runs on the carried CIFAR-10-LT shards (.data/cifar10-lt-if100): by default
#     SHIKE and balanced softmax for seed 0, 200 epochs each, augmented on the GPU, the test
#     split also evaluated after each of the last 20 epochs (last against best), stopping what
#     still runs when BUDGET_S seconds have passed since the script started.
#     Runs checkpoint every CHECKPOINT_EVERY (5) epochs into $CHECKPOINTS (carry the folder:
#     .data/ is ignored by git), so the next call, or the next session, continues them.
# Everything worth keeping lands in $OUT (at most 8 files): BENCHMARKS.part.md (the benchmarks'
# sections; merge them into BENCHMARKS.md with `python -m bench.record BENCHMARKS.part.md`),
# results.jsonl, logs.tar.gz, and ckpt-<run>.tar per run (unpack into $CHECKPOINTS here to carry
# it again).
# A dry run on a CPU (no wheels, two epochs, the raw CIFAR-10 folder):
#   WHEELS= AUGMENT_BENCH=0 DATA=../shared/data/cifar10 OUT=/tmp/dry CHECKPOINTS=/tmp/dry-ckpt \
#     EXTRA="--set optim.epochs=2 --set optim.stage2_start=1 --set data.n_max=300" \
#     TEST_FROM=1 bash bench/gpu_session.sh
set -uo pipefail
OUT=${OUT:-/tmp/gpu-session}
mkdir -p "$OUT"
STARTED=$(date +%s)
BUDGET_S=${BUDGET_S:-560}
SEEDS=${SEEDS:-0}
VARIANTS=${VARIANTS:-shike balanced_softmax}
PARALLEL=${PARALLEL:-1}  # runs sharing the GPU
WORKERS=${WORKERS:-4}    # loader workers a run (evaluation splits; training augments on the GPU)
TEST_FROM=${TEST_FROM:-181}  # test top-1 after each epoch from this one on (train.test_from_epoch)
DATA=${DATA:-.data/cifar10-lt-if100}
CHECKPOINTS=${CHECKPOINTS:-.data/gpu-checkpoints}
EXTRA=${EXTRA:-}  # more --set overrides, e.g. "--set optim.epochs=2" for a dry run

# WHEELS= (empty) skips the install: a dry run here, where the packages are in the venv.
WHEELS=${WHEELS-.whl}
if [ -n "$WHEELS" ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site "$WHEELS"/*.whl || exit 1
fi
LOGS=/tmp/session-logs
mkdir -p "$LOGS"
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 BENCHMARKS_FILE=$OUT/BENCHMARKS.part.md
export BENCHMARKS_HISTORY=$LOGS/HISTORY.part.md  # a fresh part page replaces nothing
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c 'import torch, os; print("torch", torch.__version__, torch.cuda.get_device_name(0), os.cpu_count(), "CPUs")'

timeout 150 python3 -m pytest -q -p no:cacheprovider tests/unit/test_cuda_graph_step.py >"$LOGS/pytest.log" 2>&1
status=$?
tail -n 3 "$LOGS/pytest.log"
# Failures that are only tolerance misses (AssertionError) still mean the graph captures and
# replays; any other error (a capture that raises) means the eager step.
other_errors=$(grep -E "^E +[A-Za-z_.]*(Error|Exception)" "$LOGS/pytest.log" | grep -vc AssertionError)
if [ $status -eq 0 ] || { [ $status -eq 1 ] && [ "$other_errors" = 0 ]; }; then
    MODE="--set train.amp=false --set train.cuda_graphs=true"
    [ $status -eq 0 ] || echo "CUDA tests: tolerance misses only (see pytest.log); reproduce uses the graph"
else MODE="--set train.amp=true"; echo "CUDA tests failed: reproduce runs eager with AMP"; fi
if timeout 120 python3 -m pytest -q -p no:cacheprovider tests/unit/test_batch_augment.py >"$LOGS/pytest-augment.log" 2>&1; then
    MODE="$MODE --set data.augment_on=device"
else MODE="$MODE --set data.augment_on=loader"; echo "on-device augmentation tests failed: the loader augments"; fi
tail -n 2 "$LOGS/pytest-augment.log"

if [ "${AUGMENT_BENCH:-1}" = 1 ]; then
    timeout 150 python3 -m bench.augment_speed --data "$DATA" --train-epochs 2 2>&1 | tail -n 12
fi
# data.decode_on=device: nvJPEG crops against the CPU decoder's (same boxes, pixels within
# rounding); the bench row below times the same decode_crops the workers run.
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/unit/test_device_decode.py >"$LOGS/pytest-decode.log" 2>&1
tail -n 2 "$LOGS/pytest-decode.log"
if [ "${DECODE_BENCH:-1}" = 1 ]; then timeout 60 python3 -m bench.gpu_decode 2>&1 | tail -n 7; fi
if [ "${LOADER_BENCH:-0}" = 1 ]; then
    timeout 60 python3 -m bench.loader_speed --data "$DATA" --workers 4 12 2>&1 | tail -n 4
fi
if [ "${STEP_BENCH:-0}" = 1 ]; then timeout 90 python3 -m bench.train_step --steps 50 2>&1 | tail -n 12; fi

# what is left of the budget, less the time to stop the runs and write the summary
DEADLINE_MIN=$(python3 -c "print(max(1, $BUDGET_S - ($(date +%s) - $STARTED) - 20) / 60)")
echo "reproduce: deadline in $DEADLINE_MIN min"
# shellcheck disable=SC2086
python3 -m bench.reproduce --config configs/cifar10_lt_if100.yaml --data "$DATA" \
    --seeds $SEEDS --variants $VARIANTS --parallel "$PARALLEL" --deadline-min "$DEADLINE_MIN" \
    --log-dir "$LOGS/runs" --results "$OUT/results.jsonl" --checkpoints "$CHECKPOINTS" \
    $MODE --set data.loader_workers="$WORKERS" --set train.threads=2 \
    --set train.test_from_epoch="$TEST_FROM" \
    --set train.checkpoint_every="${CHECKPOINT_EVERY:-5}" $EXTRA 2>&1 | tail -n 40
for f in "$LOGS"/runs/*.log; do echo "== $f"; grep -E "^(==|data:|resumed|epoch +(1|50|100|150|180|181|200)/|test:|wall)" "$f"; tail -n 2 "$f"; done >"$LOGS/run_summary.txt" 2>&1
cat "$LOGS/run_summary.txt"
tar -czf "$OUT/logs.tar.gz" -C /tmp session-logs
# A finished run needs only its result to be reported again; an unfinished one its checkpoint
# (9.6 MiB for SHIKE in stage 1, 3.7 MiB for ResNet-32; a call carries 64 MiB, of which the
# shards take 49: with PARALLEL=1 at most one run is unfinished at a time).
for run in "$CHECKPOINTS"/*/; do
    [ -d "$run" ] || continue
    name=$(basename "$run")
    if [ -f "$run/result.json" ]; then keep="$name/result.json"; else keep="$name"; fi
    tar -cf "$OUT/ckpt-$name.tar" -C "$CHECKPOINTS" $keep
done
