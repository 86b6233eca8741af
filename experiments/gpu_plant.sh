#!/usr/bin/env bash
# Plant the issue-21 grid's backdoored subjects on a lent GPU, with `bdclean train` from the shared clean
# CIFAR-10 ResNets (carried in .gpu/plant with 16,000 training images and 2,000 test images, made by
# experiments/gpu_plant_data.py). The subjects come back in $OUT; their ASR on the full test split is
# measured afterwards on this machine.
#   bash experiments/gpu_plant.sh            (EPOCHS, LR, DEVICE and LIMIT override the defaults)
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/plant-out}; mkdir -p "$OUT"
BD="python3 -m backdoor_cli.cli"
D=.gpu/plant
NORM=(--mean 0.485,0.456,0.406 --std 0.229,0.224,0.225)
plant() {  # name arch trigger rate
    local name=$1 arch=$2 trig=$3 rate=$4 ckpt
    ckpt=$(ls $D/$arch-*.th)
    timeout 120 $BD train --init "$ckpt" --arch "$arch" --data "$D" "${NORM[@]}" --trigger "$trig" \
        --poison-rate "$rate" --epochs "${EPOCHS:-3}" --lr "${LR:-0.02}" --weight-decay 5e-4 \
        --device "${DEVICE:-cuda}" ${LIMIT:+--train-limit $LIMIT} --out "$OUT/$name.safetensors" --force --json \
        > "$OUT/$name.json" 2> "$OUT/$name.err"
    echo "$name rc=$? $(python3 -c "import json,sys; r=json.load(open('$OUT/$name.json'))['metrics']; print('C-Acc', r['clean_acc']['value'], 'ASR', r['asr']['value'])" 2>&1 | tail -1)"
}
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | tee "$OUT/machine.txt"
plant r20-patch4 resnet20 experiments/triggers/patch4.yaml 0.05
plant r20-patch3tl5 resnet20 experiments/triggers/patch3-tl5.yaml 0.03
plant r20-blend resnet20 blended 0.05
plant r20-sig resnet20 sig 0.05
plant r20-wanet resnet20 wanet 0.1
plant r56-patch4 resnet56 experiments/triggers/patch4.yaml 0.05
plant r56-blend resnet56 blended 0.05
plant r56-sig resnet56 sig 0.05
tail -n 3 "$OUT"/*.err | tail -40
