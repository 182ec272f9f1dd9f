#!/usr/bin/env bash
# Everything the Triton ECA block end needs from a CUDA machine, in one run of about 9 minutes:
#   1. the Triton cases of tests/test_cuda.py;
#   2. training and inference throughput with --eca-impl triton and reference, each against the
#      original formulation and torchvision in the same process (bf16 autocast, batch 128, 224 px):
#      ECA-ResNet-50 in both layouts, then its training under --compile (channels_last, triton),
#      then ECA-ResNet-18 and ECA-MobileNetV2 in both layouts, then ResNet-50 with auto;
#   3. a profile of an ECA-ResNet-50 training step with the Triton kernels (CUDA time per operator);
#   4. time allowing, ResNet-50 compiled with reference, and the rest of test_cuda.py's fast tests.
# Steps run in that order (most needed first), each under a time limit, until the budget is spent;
# a failing step is logged and the rest still run. Every step's output is in OUTPUT_DIR/NN-name.log,
# the commands, exit codes and times in OUTPUT_DIR/summary.txt, the machine in OUTPUT_DIR/machine.txt.
#
#   bash scripts/gpu_check.sh [OUTPUT_DIR]       (default: runs/gpu_check)
#   GPU_CHECK_BUDGET=seconds (default 540); GPU_CHECK_STEPS=regex of the step names to run (default: all),
#   e.g. GPU_CHECK_STEPS='bench|profile' to measure again without the tests.
set -u
cd "$(dirname "$0")/.."
OUT=${1:-runs/gpu_check}
BUDGET=${GPU_CHECK_BUDGET:-540}
STEPS=${GPU_CHECK_STEPS:-.}
mkdir -p "$OUT"
: > "$OUT/summary.txt"
STEP=0

# One step: NAME LIMIT COMMAND... Runs under min(LIMIT, what is left of the budget); skipped when under 30 s are left.
step() {
    local name=$1 limit=$2
    shift 2
    [[ $name =~ $STEPS ]] || return 0
    STEP=$((STEP + 1))
    local left=$((BUDGET - SECONDS))
    local log
    log=$(printf "%s/%02d-%s.log" "$OUT" "$STEP" "$name")
    if [ "$left" -lt 30 ]; then
        echo "-- $name: skipped, $left s of the budget left" | tee -a "$OUT/summary.txt"
        return
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    echo "== $name (limit $limit s): $*" | tee -a "$OUT/summary.txt"
    local start=$SECONDS
    timeout --kill-after=10 "$limit" "$@" > "$log" 2>&1
    local status=$?
    local outcome="exit $status"
    [ "$status" -eq 124 ] && outcome="stopped at the time limit"
    echo "   $outcome after $((SECONDS - start)) s" | tee -a "$OUT/summary.txt"
}

# scripts/benchmark.py's layout flags, asked once: --channels-last where it has one, else --formats.
if python scripts/benchmark.py model --help 2>/dev/null | grep -q -- "--channels-last"; then
    LAYOUT_NCHW="" LAYOUT_CHANNELS_LAST="--channels-last"
else
    LAYOUT_NCHW="--formats NCHW" LAYOUT_CHANNELS_LAST="--formats channels_last"
fi
layout_flags() {
    if [ "$1" = channels_last ]; then echo "$LAYOUT_CHANNELS_LAST"; else echo "$LAYOUT_NCHW"; fi
}

benchmark() {  # benchmark ARCH IMPL LAYOUT LIMIT [EXTRA...]
    local arch=$1 impl=$2 layout=$3 limit=$4
    shift 4
    # shellcheck disable=SC2046  # layout_flags gives one or two words
    step "bench-$arch-$impl-$layout${1:+-compile}" "$limit" python scripts/benchmark.py model -a "$arch" \
        --device cuda --eca-impl "$impl" --amp bf16 --batch-size 128 --image-size 224 \
        --repeats 5 --iterations 10 --warmup 2 $(layout_flags "$layout") "$@"
}

{
    date -u
    git rev-parse HEAD 2>/dev/null
    nvidia-smi 2>&1
    python -c "import sys, torch, triton; print(sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__)" 2>&1
} > "$OUT/machine.txt"

# The first run of each Triton kernel specialisation compiles it: most of this step's time on a fresh machine.
step cuda-tests-triton 200 python -m pytest tests/test_cuda.py -q -k triton
for layout in channels_last nchw; do
    for impl in triton reference; do
        benchmark eca_resnet50 "$impl" "$layout" 60
    done
done
benchmark eca_resnet50 triton channels_last 200 --compile --modes train
for arch in eca_resnet18 eca_mobilenet_v2; do
    for layout in channels_last nchw; do
        for impl in triton reference; do
            benchmark "$arch" "$impl" "$layout" 45
        done
    done
done
benchmark eca_resnet50 auto channels_last 60
step profile-eca_resnet50-triton 60 python scripts/benchmark.py profile -a eca_resnet50 --device cuda \
    --eca-impl triton --amp bf16 --batch-size 128 --image-size 224 --modes train $(layout_flags channels_last) \
    --steps 3 --top 20
benchmark eca_resnet50 reference channels_last 200 --compile --modes train
step cuda-tests-rest 120 python -m pytest tests/test_cuda.py -q -m "not slow" -k "not triton"
echo "done after $SECONDS s; logs in $OUT" | tee -a "$OUT/summary.txt"
