#!/bin/bash
# The issue-12 grid: each subject purified by the paper's FST and by the recommended recipe (no --method),
# with the defender's 1,000 clean images drawn from the CIFAR-10 test split (fresh to every subject) and
# scored on the other 9,000 test images. Made by: experiments/make_split.py runs/split
#   bash experiments/recipe_grid.sh OUTDIR SUBJECT...
# EXTRA="--arch resnet56 --mean ... --std ... --trigger blended" adds flags (a clean published model).
# METHODS="recommended fst" (the default) names the runs.
set -u
out=$1; shift
mkdir -p "$out"
for subject in "$@"; do
  name=$(basename "$subject" .safetensors)
  for method in ${METHODS:-recommended fst}; do
    flag=(); [ "$method" != recommended ] && flag=(--method "$method")
    [ -s "$out/$name-$method.json" ] && continue
    .venv/bin/bdclean purify "$subject" --data runs/split/eval --clean-data runs/split/defender.npz \
      "${flag[@]}" ${EXTRA:-} --out "$out/$name-$method" --force --json > "$out/$name-$method.json" 2> "$out/$name-$method.err"
    echo "$name $method rc=$?"
  done
done
