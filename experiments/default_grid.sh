#!/usr/bin/env bash
# The issue-21 measurements of the scan-guided default beside the paper's FST, one subject at a time:
#   bash experiments/default_grid.sh OUTDIR NAME CHECKPOINT [extra purify flags...]
# e.g. bash experiments/default_grid.sh runs/grid r20-patch4 subjects/r20-patch4.safetensors
#      bash experiments/default_grid.sh runs/grid r20-clean ../shared/data/checkpoints/resnet20-12fca82f.th \
#           --arch resnet20 --mean 0.485,0.456,0.406 --std 0.229,0.224,0.225
# PROTOCOL (default "train"): the clean-data protocol.
#   train: 1,000 images of the training split (the paper's 2%), scored on the 10,000 test images;
#   fresh: the defender's 1,000 test images of experiments/make_split.py (SPLIT, default runs/split), which
#          no subject was trained on, scored on the other 9,000.
# EVAL_LIMIT=N scores a seeded, stratified N of them instead (the runs before the fourteenth session used 2,000:
# a cost on 2,000 images moved by up to 1.7 points against the whole split, docs/purification.md).
# METHODS (default "default fst") names the runs; experiments/default_table.py tabulates.
set -u
out=$1; name=$2; ckpt=$3; shift 3
mkdir -p "$out"
BD=${BD:-.venv/bin/bdclean}
case "${PROTOCOL:-train}" in
  train) data=(--data cifar10 --data-dir "${DATA_DIR:-../shared/data}" --clean-count 1000) ;;
  fresh) split=${SPLIT:-runs/split}; data=(--data "$split/eval" --clean-data "$split/defender.npz") ;;
  *) echo "PROTOCOL must be train or fresh" >&2; exit 2 ;;
esac
for method in ${METHODS:-default fst}; do
  flag=(); [ "$method" != default ] && flag=(--method "$method")
  [ -s "$out/$name-$method.json" ] && continue
  start=$(date +%s.%N)
  $BD purify "$ckpt" "${data[@]}" ${EVAL_LIMIT:+--eval-limit "$EVAL_LIMIT"} --device "${DEVICE:-cpu}" "${flag[@]}" "$@" \
    --out "$out/$name-$method" --force --json > "$out/$name-$method.json" 2> "$out/$name-$method.err"
  rc=$?
  echo "$name $method rc=$rc wall=$(echo "$(date +%s.%N) - $start" | bc)s" | tee -a "$out/summary.txt"
done
