#!/bin/bash
# The runs behind docs/scan.md, in the order they ran (one at a time, niced, one thread: the machine was
# shared). Run from the repository root; outputs go to runs/ (gitignored). ~35 min on a busy 2-core CPU.
set -e
BD="nice -n 15 env OMP_NUM_THREADS=1 ${PYTHON:-.venv/bin/python} -m backdoor_cli.cli"
D="--data ${DATA:-../shared/data}/cifar10"
CK=${DATA:-../shared/data}/checkpoints
R20="--arch resnet20 --mean 0.485,0.456,0.406 --std 0.229,0.224,0.225"
R56="--arch resnet56 --mean 0.485,0.456,0.406 --std 0.229,0.224,0.225"
mkdir -p runs/subjects runs/scan runs/purify

train() { name=$1; shift; $BD train --arch simple_cnn_half $D "$@" --epochs 4 --seed 0 \
    --out runs/subjects/$name.safetensors --force --json > runs/subjects/$name.json; }
scan() { name=$1; shift; $BD scan "$@" $D --out runs/scan/$name --force --json > runs/scan/$name.json || [ $? = 1 ]; }
# Purify with the scan's reconstructed trigger, then measure both models with the TRUE trigger.
verify() { name=$1 subj=$2 true_trigger=$3 method=$4
    $BD purify $subj --method $method $D --trigger runs/scan/$name/class0-trigger.yaml --eval-limit 2000 \
        --out runs/purify/$name-$method --force --json > runs/purify/$name-$method.json
    $BD compare $subj runs/purify/$name-$method/purified.safetensors $D --trigger $true_trigger --eval-limit 2000 \
        --json > runs/purify/$name-$method-true.json; }

# Subjects. The Blended 1% ResNet-20 is docs/purification.md's (its command is there); copy it to
# runs/subjects/r20-blended-0.01.safetensors. The first subject used all 50,000 training images and 2
# threads; the later ones 20,000 images (--train-limit) and 1 thread, to fit the time available.
train scnn-badnets-0.05 --trigger badnets --poison-rate 0.05
train scnn-blended-0.05 --trigger blended --poison-rate 0.05 --train-limit 20000
train scnn-badnets-0.01 --trigger badnets --poison-rate 0.01 --train-limit 20000
train scnn-clean --train-limit 20000

scan scnn-badnets-0.05 runs/subjects/scnn-badnets-0.05.safetensors
scan scnn-badnets-0.05-300steps runs/subjects/scnn-badnets-0.05.safetensors --steps 300
scan r20-blended-0.01 runs/subjects/r20-blended-0.01.safetensors
scan r20-clean $CK/resnet20-12fca82f.th $R20
scan r20-clean-seed1 $CK/resnet20-12fca82f.th $R20 --seed 1
scan r56-clean $CK/resnet56-4bfd9763.th $R56
scan scnn-blended-0.05 runs/subjects/scnn-blended-0.05.safetensors
scan scnn-badnets-0.01 runs/subjects/scnn-badnets-0.01.safetensors
scan scnn-clean runs/subjects/scnn-clean.safetensors

verify scnn-badnets-0.05 runs/subjects/scnn-badnets-0.05.safetensors badnets fst
verify scnn-badnets-0.05 runs/subjects/scnn-badnets-0.05.safetensors badnets ft
verify scnn-badnets-0.05 runs/subjects/scnn-badnets-0.05.safetensors badnets fst-kd
verify r20-blended-0.01 runs/subjects/r20-blended-0.01.safetensors blended fst
verify r20-blended-0.01 runs/subjects/r20-blended-0.01.safetensors blended fst-kd
verify scnn-blended-0.05 runs/subjects/scnn-blended-0.05.safetensors blended fst
verify scnn-badnets-0.01 runs/subjects/scnn-badnets-0.01.safetensors badnets fst

${PYTHON:-.venv/bin/python} experiments/scan_table.py runs/scan/scnn-badnets-0.05.json=0 \
    runs/scan/scnn-badnets-0.05-300steps.json=0 runs/scan/scnn-badnets-0.01.json=0 runs/scan/scnn-blended-0.05.json=0 \
    runs/scan/r20-blended-0.01.json=0 runs/scan/scnn-clean.json runs/scan/r20-clean.json runs/scan/r20-clean-seed1.json \
    runs/scan/r56-clean.json
${PYTHON:-.venv/bin/python} experiments/verify_table.py runs/purify/scnn-badnets-0.05-fst runs/purify/scnn-badnets-0.05-ft \
    runs/purify/scnn-badnets-0.05-fst-kd runs/purify/scnn-blended-0.05-fst runs/purify/scnn-badnets-0.01-fst \
    runs/purify/r20-blended-0.01-fst runs/purify/r20-blended-0.01-fst-kd
