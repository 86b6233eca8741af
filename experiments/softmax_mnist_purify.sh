#!/usr/bin/env bash
# Issue 21: purify the softmax-ended MNIST CNN (experiments/softmax_mnist.py) in both endings with the
# recipe and three methods, with the crop (--augment: the old default on MNIST) and with the data's rule.
# Prints: ending, method, augmentation, C-Acc before, after (2,000 test images, CPU).
#   experiments/softmax_mnist_purify.sh runs/softmax_mnist_ceprobs.pt ../shared/data/mnist
set -euo pipefail
model=$1 data=$2 py=${PY:-/work/main/.venv/bin/python}
for ending in module_softmax functional_softmax; do
  for method in recipe fst fst-kd ft-kd; do
    for aug in --augment data; do
      out=runs/softmax_purify/$ending-$method-${aug#--}
      args=(); [ "$method" != recipe ] && args+=(--method "$method"); [ "$aug" != data ] && args+=("$aug")
      "$py" -m backdoor_cli.cli purify "$model" --arch "experiments/softmax_mnist_arch.py:$ending" --data "$data" \
        --out "$out" --eval-limit 2000 --device cpu --force --quiet "${args[@]}"
      "$py" -c "import json,sys; r=json.load(open(sys.argv[1])); print(sys.argv[2], sys.argv[3], sys.argv[4],
f\"{r['before']['clean_acc']['value']:.2%}\", f\"{r['after']['clean_acc']['value']:.2%}\", sep='\t')" \
        "$out/report.json" "$ending" "$method" "$aug"
    done
  done
done
