#!/usr/bin/env bash
# Every GPU figure the README asks for, in one run from a checkout (nothing installed):
#   benchmarks/gpu_run.sh RESULTS_DIR [speed|quality|all]
# "speed" times segmentation and training against the book (a few minutes on an H200);
# "quality" runs the demo recipe at real CT's 0.8 mm pixels and scores it on three sets of
# 24 fresh phantoms (benchmarks/bench_heldout.py).  Only small text files go to
# RESULTS_DIR; phantoms and checkpoints go to $LUNASEG_GPU_WORK (default /tmp/lunaseg-gpu).
# Set PYTHON to choose the interpreter.
set -euo pipefail

results=${1:?usage: benchmarks/gpu_run.sh RESULTS_DIR [speed|quality|all]}
stage=${2:-all}
case $stage in speed|quality|all) ;; *) echo "unknown stage: $stage" >&2; exit 2;; esac
python=${PYTHON:-python3}
work=${LUNASEG_GPU_WORK:-/tmp/lunaseg-gpu}
cd "$(dirname "$0")/.."
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
mkdir -p "$results" "$work"

step() {  # step NAME COMMAND...: run, keep its output in RESULTS_DIR/NAME.txt, time it
    local name=$1; shift
    echo "== $name: $*"
    local start=$SECONDS
    # Progress bars become one line per update; keep everything but them.
    # (grep's own "nothing left" status is not a failure; the command's status still is.)
    "$@" 2>&1 | tr '\r' '\n' | { grep -v -E '\[[0-9:]+<[0-9:?]+' || true; } \
        | tee "$results/$name.txt"
    echo "== $name took $((SECONDS - start)) s" | tee -a "$results/$name.txt"
}

"$python" - <<'EOF' | tee "$results/machine.txt"
import platform, torch
print("torch", torch.__version__, "python", platform.python_version())
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(f"cuda:{i} {p.name}, {p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs")
EOF

if [[ $stage == speed || $stage == all ]]; then
    step segment "$python" benchmarks/bench_segment.py --device cuda --slices 128 --repeat 3 \
        --tta 1,4 --book --book-batch-size 4 --book-workers 4
    step segment_compile "$python" benchmarks/bench_segment.py --device cuda --slices 128 \
        --repeat 3 --compile
    step train "$python" benchmarks/bench_train.py --device cuda --amp --channels-last \
        --batch-sizes 16,64,256,1024 --book --book-workers 8
    step train_compile "$python" benchmarks/bench_train.py --device cuda --amp --channels-last \
        --compile --batch-sizes 256,1024
fi

if [[ $stage == quality || $stage == all ]]; then
    step demo512 "$python" -m lunaseg demo --shape 64,512,512 --out "$work/demo512"
    step heldout "$python" benchmarks/bench_heldout.py --model "$work/demo512/run/checkpoint.pt" \
        --seeds 7 8 9 --shape 64,512,512 --work "$work/heldout"
fi
