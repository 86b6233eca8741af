#!/usr/bin/env bash
# A CI pipeline step: refuse a model whose backdoor fires, accept it once purified.
#
#   examples/ci/gate.sh SUSPECT.safetensors DATA_DIR [WORK_DIR]
#
# 1. `bdclean evaluate --max-asr 10%` on the suspect model: exit 1 means the gate caught a backdoor.
# 2. `bdclean purify --method fst` with the same gate plus --max-acc-drop: exit 0 means the purified
#    weights are fit to ship. Every result is also saved as JSON for the build's artefacts.
# Extra options: BDCLEAN_ARGS go to both steps (e.g. --trigger my-trigger.yaml --device cpu), and
# BDCLEAN_PURIFY_ARGS to the purification only (e.g. --clean-count 300 --epochs 10).
# Without --trigger, the trigger recorded in the checkpoint's metadata (models from `bdclean train`) is used.
set -uo pipefail

suspect=${1:?usage: gate.sh SUSPECT DATA_DIR [WORK_DIR]}
data=${2:?usage: gate.sh SUSPECT DATA_DIR [WORK_DIR]}
work=${3:-gate-out}
bdclean=${BDCLEAN:-bdclean}
read -r -a extra <<< "${BDCLEAN_ARGS:-}"
read -r -a purify_extra <<< "${BDCLEAN_PURIFY_ARGS:-}"
mkdir -p "$work"

"$bdclean" evaluate "$suspect" --data "$data" --max-asr 10% --json --quiet "${extra[@]}" > "$work/suspect.json"
status=$?
case $status in
  0) echo "gate: suspect model passes (ASR <= 10%)";;
  1) echo "gate: BLOCKED - the suspect model's backdoor fires (see $work/suspect.json)";;
  *) echo "gate: evaluation failed with exit code $status"; exit "$status";;
esac

if [ "$status" -eq 1 ]; then
  "$bdclean" purify "$suspect" --method fst --data "$data" --out "$work/purified" --force \
      --max-asr 10% --max-acc-drop 10% --json --quiet "${extra[@]}" "${purify_extra[@]}" > "$work/purify.json"
  status=$?
  case $status in
    0) echo "gate: PASSED after purification -> $work/purified/purified.safetensors";;
    1) echo "gate: FAILED - purification did not meet the gates (see $work/purify.json)"; exit 1;;
    *) echo "gate: purification failed with exit code $status"; exit "$status";;
  esac
fi
