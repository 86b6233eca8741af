#!/bin/bash
# FST's accuracy cost on the small CNN of docs/results-cpu.md: vary alpha and the tuning length, one at a time.
# Needs the BadNets subject made by the command in docs/results-cpu.md.
cd "$(dirname "$0")/.."
m=runs/results-cpu/models/badnets-0.01.safetensors
for spec in "alpha0.05:--alpha 0.05" "alpha0.1:--alpha 0.1" "epochs20:--epochs 20"; do
  name=${spec%%:*}; args=${spec#*:}
  { time .venv/bin/bdclean purify $m --method fst --data ../shared/data/cifar10 --out runs/investigate/$name --force --json --quiet $args ; } > runs/investigate-$name.json 2> runs/investigate-$name.log
done
