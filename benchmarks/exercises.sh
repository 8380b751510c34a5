#!/usr/bin/env bash
# The measurements behind docs/exercises.md (chapter 13's exercises 2, 3 and 4), on the demo's
# phantoms: trainings with the demo's recipe that differ in one setting, each scored on its
# own validation / test split and on the same 72 fresh phantoms (bench_heldout.py), and the
# crops-only model on the real CT in ../shared.  About an hour on 2 CPU cores.
#
#   bash benchmarks/exercises.sh DEMO_DIR WORK [SHARED]
#
# DEMO_DIR is a finished `lunaseg demo --out DEMO_DIR` (its data/ and its run/ are the
# baseline: seed 0, no test split, whole slices mixed in); WORK keeps every run and the
# text of every figure (WORK/*.txt); SHARED defaults to ../shared; HELDOUT (default
# WORK/heldout) holds the fresh phantom sets, made once and reused.
set -euo pipefail
demo=${1:?usage: exercises.sh DEMO_DIR WORK [SHARED]}
work=${2:?usage: exercises.sh DEMO_DIR WORK [SHARED]}
shared=${3:-$(dirname "$0")/../../shared}
here=$(cd "$(dirname "$0")/.." && pwd)
py=${PYTHON:-$here/.venv/bin/python}
data=$demo/data
mkdir -p "$work"
recipe=(--val-stride 6 --epoch-samples 2048 --device cpu)

train() {  # NAME ARGS...: a training with the demo's recipe, kept in WORK/NAME
    local name=$1; shift
    [ -f "$work/$name/checkpoint.best.pt" ] && [ -f "$work/$name/.done" ] && return
    rm -rf "${work:?}/$name"
    "$py" -m lunaseg -q train --data "$data" --out "$work/$name" "${recipe[@]}" "$@" \
        > "$work/$name.train.txt" 2>&1
    touch "$work/$name/.done"
}

score() {  # NAME SPLIT: lunaseg evaluate on one split of the run's own splits
    "$py" -m lunaseg -q evaluate --data "$data" --model "$work/$1/checkpoint.best.pt" \
        --split "$2" --out "$work/$1-eval-$2" --overlays 0 > "$work/$1.$2.txt" 2>&1
}

heldout() {  # NAME CKPT: the same 72 fresh phantoms for every model
    "$py" "$here/benchmarks/bench_heldout.py" --model "$2" --seeds 7 8 9 \
        --work "${HELDOUT:-$work/heldout}" > "$work/$1.heldout.txt" 2>&1
}

real() {  # NAME CKPT: candidates per scan on the real CT
    rm -rf "${work:?}/$1-real"
    "$py" -m lunaseg -q segment "$shared/data/lidc-idri-0001/dicom" \
        "$shared/data/tcia-c3n-00247/dicom" --model "$2" --out "$work/$1-real" \
        --overlays 0 --no-volumes --device cpu > "$work/$1.real.txt" 2>&1
}

# Exercise 2: a test split (every 5th of the non-validation scans: 16 of 80), two seeds.
for seed in 0 1; do
    train "test-seed$seed" --test-stride 5 --seed "$seed"
    score "test-seed$seed" val
    score "test-seed$seed" test
done
heldout test-seed0 "$work/test-seed0/checkpoint.best.pt"
heldout demo "$demo/run/checkpoint.best.pt"

# Exercise 4: crops only against the demo's mix of crops and whole slices.
train crops-only --mix-full-slices 0 --seed 0
score crops-only val
heldout crops-only "$work/crops-only/checkpoint.best.pt"
# Exercise 3: the 3-class U-Net (background, benign, malignant) with the same recipe.
train three-class --classes 3 --seed 0
score three-class val
heldout three-class "$work/three-class/checkpoint.best.pt"

if [ -d "$shared/data" ]; then
    real demo "$demo/run/checkpoint.best.pt"
    real crops-only "$work/crops-only/checkpoint.best.pt"
fi
grep -H "CPM\|candidate sensitivity\|candidates per scan" "$work"/*.val.txt \
    "$work"/*.test.txt || true
grep -H "all together" "$work"/*.heldout.txt || true
grep -H "candidates ->" "$work"/*.real.txt || true
