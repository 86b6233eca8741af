#!/usr/bin/env bash
# A CI step for a model whose trigger nobody knows: scan it against a clean model of the same task, and
# ship it only once the default purify has verified the removal without the trigger.
#
#   examples/ci/scan_gate.sh SUSPECT.safetensors CLEAN_REFERENCE.safetensors DATA_DIR [WORK_DIR]
#
# 1. `bdclean scan --clean-reference --fail-on-detect`: exit 0 means no backdoor is suspected (a flagged
#    class the clean model follows too is a shortcut of the data, not a backdoor); exit 1 means one is.
# 2. Then `bdclean purify` (the default: scan, unlearn, verify) with --clean-reference --require-verified:
#    exit 0 means the planted trigger the scan found is gone, verified without knowing it, and the
#    purified weights are fit to ship; exit 1 means the removal could not be verified (or failed).
# Every result is saved as JSON for the build's artefacts. Extra options: BDCLEAN_ARGS go to both steps
# (e.g. --device cpu, or --arch for a checkpoint without bdclean metadata), BDCLEAN_SCAN_ARGS to the scan
# (e.g. --clean-count 800) and BDCLEAN_PURIFY_ARGS to the purification (e.g. --clean-count 1000).
set -uo pipefail

usage="usage: scan_gate.sh SUSPECT CLEAN_REFERENCE DATA_DIR [WORK_DIR]"
suspect=${1:?$usage}
reference=${2:?$usage}
data=${3:?$usage}
work=${4:-scan-gate-out}
bdclean=${BDCLEAN:-bdclean}
read -r -a extra <<< "${BDCLEAN_ARGS:-}"
read -r -a scan_extra <<< "${BDCLEAN_SCAN_ARGS:-}"
read -r -a purify_extra <<< "${BDCLEAN_PURIFY_ARGS:-}"
mkdir -p "$work"

"$bdclean" scan "$suspect" --data "$data" --clean-reference "$reference" --fail-on-detect --json --quiet \
    "${extra[@]}" "${scan_extra[@]}" > "$work/scan.json"
status=$?
case $status in
  0) echo "gate: no backdoor suspected (see $work/scan.json)"; exit 0;;
  1) echo "gate: BLOCKED - a backdoor is suspected (see $work/scan.json); purifying";;
  *) echo "gate: the scan failed with exit code $status"; exit "$status";;
esac

"$bdclean" purify "$suspect" --data "$data" --clean-reference "$reference" --require-verified \
    --out "$work/purified" --force --json --quiet "${extra[@]}" "${purify_extra[@]}" > "$work/purify.json"
status=$?
case $status in
  0) echo "gate: PASSED - removal verified without the trigger -> $work/purified/purified.safetensors";;
  1) echo "gate: FAILED - the removal could not be verified (see $work/purify.json: removal)"; exit 1;;
  *) echo "gate: purification failed with exit code $status"; exit "$status";;
esac
