#!/usr/bin/env bash
# The GPU measurements of issue 24, as run on a lent NVIDIA machine (docs/gpu.md says what came back).
# The machine has torch, pytest and the other packages but no bdclean install and no ../shared, so the
# data travels in three carried parts (.gpu/a, .gpu/b, .gpu/c: a tar of cifar10/{train,test}.npz cut
# in pieces that fit one transfer), assembled under /tmp and checked against its md5 before use.
#
#   bash experiments/gpu_run.sh tests     # call 1 (carry .gpu/a): the test suite on CUDA, the start-up bench
#   bash experiments/gpu_run.sh stash     # call 2 (carry .gpu/b): keep the part, run the bench on a clean model
#   bash experiments/gpu_run.sh main      # call 3 (carry .gpu/c): plant, bench, the paper's table, CLI timing
#
# Everything lands in $OUT (at most 8 files come back): logs and a tar of the JSON results.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu-out}; mkdir -p "$OUT"
STORE=/tmp/bdclean-gpu; mkdir -p "$STORE"
PY=python3
BD="$PY -m backdoor_cli.cli"

stash() {  # keep every carried part outside the repo: later calls replace .gpu/
    for d in .gpu/a .gpu/b .gpu/c; do [ -d "$d" ] && cp -n "$d"/* "$STORE"/ 2>/dev/null; done
    ls -l "$STORE"
}

assemble() {
    [ -f "$STORE/cifar10/train.npz" ] && return 0
    cat "$STORE"/cifarpart.0* > "$STORE/cifar.tar" || return 1
    (cd "$STORE" && md5sum -c cifar.md5 | sed 's/^/md5: /') || { echo "CIFAR-10 parts are incomplete"; return 1; }
    tar xf "$STORE/cifar.tar" -C "$STORE" && rm "$STORE/cifar.tar"
}

machine() {
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv | tee "$OUT/machine.txt"
    $PY -c "import torch, sys; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'python', sys.version.split()[0])" \
        | tee -a "$OUT/machine.txt"
    nproc | sed 's/^/cpu cores: /' | tee -a "$OUT/machine.txt"
}

case "${1:-}" in
tests)
    stash; machine
    # -m "not slow": the GPU tests too. -n: pytest-xdist is on that image.
    timeout 200 $PY -m pytest -q -n 16 -m "not slow" -p no:cacheprovider -o addopts="" --tb=short -rfE 2>&1 \
        | tee "$OUT/tests-cuda.log" | tail -40
    # The tar starts with test.npz, which part a holds whole: enough for the start-up benchmark's commands
    # (a truncated tar ends in an error after the first file; the md5 of that file is the check).
    mkdir -p "$STORE/testonly"
    tar xf "$STORE/cifarpart.00" -C "$STORE/testonly" cifar10/test.npz 2>/dev/null
    echo "21a6c30c1170dc2815338d38f4a13b75  $STORE/testonly/cifar10/test.npz" | md5sum -c | sed 's/^/md5: /'
    timeout 100 $PY benchmarks/bench_startup.py --device cuda --checkpoint "$STORE/resnet20-12fca82f.th" \
        --data "$STORE/testonly/cifar10" --repeat 2 --only python,import_torch,help,plain_evaluate,evaluate,load_pair \
        --out "$OUT/startup-nvidia-h200.json" 2>&1 | tail -25 | tee "$OUT/startup.log"
    ;;
stash)
    stash
    ;;
check)  # no GPU needed: stash and assemble the carried parts, as a dry run of the data's journey
    stash; assemble && ls -l "$STORE/cifar10"
    ;;
main)
    stash; assemble || exit 1; machine
    D="$STORE/cifar10"; R="$STORE/runs"; mkdir -p "$R"
    save() {  # after every step: what has been measured so far comes back even if a later step runs out of time
        tar czf "$OUT/results.tgz" -C "$R" --exclude='*.safetensors' --exclude='purified*' --exclude='models' \
            --exclude='cli-*' . 2>/dev/null
    }
    # 1. A planted ResNet-20 (the shared clean model + a Blended backdoor), the bench's second subject.
    SUBJ20="$R/r20-blended.safetensors"
    [ -f "$SUBJ20" ] || timeout 60 $BD train --init "$STORE/resnet20-12fca82f.th" --arch resnet20 --data "$D" \
        --mean 0.485,0.456,0.406 --std 0.229,0.224,0.225 --trigger blended --poison-rate 0.01 --epochs 3 \
        --lr 0.01 --weight-decay 5e-4 --out "$SUBJ20" --force 2>&1 | tail -4 | tee "$OUT/plant.log"
    timeout 90 $PY benchmarks/bench_purify.py --device cuda --data "$D" --model "$SUBJ20" --seeds 0,1,2 \
        --json-out "$R/bench-nvidia-h200-resnet20.json" 2>&1 | tail -22 | tee "$OUT/bench.log"
    save
    # 2. The paper's table on its own model (resumes from $R/repro if a call is repeated).
    timeout 270 $PY experiments/reproduce_fst.py --data "$D" --attacks badnets,blended --rates 0.05,0.01 \
        --train-epochs "${TRAIN_EPOCHS:-12}" --runs "$R/repro" --doc "$R/reproduction.md" --quiet \
        2>&1 | tail -40 | tee "$OUT/repro.log"
    save
    # 3. The bench on a ResNet-18 subject of the table; the CLI's wall times; exactness's cost (bf16 bench).
    SUBJ18="$R/repro/models/badnets-0.01.safetensors"
    [ -f "$SUBJ18" ] || SUBJ18=$(ls "$R"/repro/models/*.safetensors 2>/dev/null | head -1)
    if [ -n "$SUBJ18" ] && [ -f "$SUBJ18" ]; then
        timeout 60 $PY benchmarks/bench_purify.py --device cuda --data "$D" --model "$SUBJ18" \
            --json-out "$R/bench-nvidia-h200-resnet18.json" 2>&1 | tail -22 | tee -a "$OUT/bench.log"
        save
        wall() {  # label, then the command: its wall time, measured around the whole process
            local label=$1; shift
            local t0=$(date +%s.%N); timeout 40 "$@" > "$R/cli-last.log" 2>&1; local rc=$?
            echo "$label: rc $rc, wall $(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN{printf "%.2f", b - a}') s" \
                | tee -a "$R/cli-wall.txt"
        }
        wall "bdclean --help" $BD --help
        wall "evaluate (full test set)" $BD evaluate "$SUBJ18" --data "$D" --quiet
        for i in 1 2 3; do
            wall "purify --method fst run $i" $BD purify "$SUBJ18" --data "$D" --method fst --out "$R/cli-fst" --force --quiet
        done
        wall "purify (default recipe)" $BD purify "$SUBJ18" --data "$D" --out "$R/cli-default" --force --quiet
        cp "$R/cli-fst/report.json" "$R/cli-fst-report.json" 2>/dev/null
        save
        timeout 50 $PY benchmarks/bench_purify.py --device cuda --data "$D" --model "$SUBJ18" --precision bf16 \
            --json-out "$R/bench-nvidia-h200-resnet18-bf16-eval.json" 2>&1 | tail -22 | tee -a "$OUT/bench.log"
        save
    fi
    cp "$R/cli-wall.txt" "$OUT/" 2>/dev/null
    ls -l "$OUT"
    ;;
*)
    echo "usage: $0 tests|stash|check|main"; exit 2 ;;
esac
