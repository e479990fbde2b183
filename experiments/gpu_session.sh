#!/usr/bin/env bash
# All the GPU work of one session, as one script (device time is scarce: ~15 minutes a session,
# at most 10 minutes a command). Run from the repository root on the device machine after the
# line ../shared/gpu/prepare-carry prints, e.g. (carry ".carry"):
#
#   <carry line> bash experiments/gpu_session.sh
#
# Stages, most important first; each writes JSON under $OUT and a failing stage does not stop
# the others. STAGES picks some ("bench retrieval probe"), SIZE=tiny checks the script on a CPU.
#   bench      experiments/bench_pretrain.py: model-only vs lightly vs ssl-blood, SimCLR 200 epochs
#   retrieval  experiments/bench_retrieval.py: real embeddings + 1M x 512 IVF
#   probe      one SimCLR full-preset run (seed 0) through reproduce.py: linear probe, kNN, few-shot
#   ablate     experiments/ablate.py over experiments/configs/gpu_round1_simclr.txt (val only)
#   fixmatch   quick-preset SimCLR, then experiments/consistency.py (logistic / fixmatch / from
#              scratch at 40 random labels, seed 0) with 3000 steps: the GPU's budget, not the CPU's;
#              three recipes on val (the CPU's default, EMA teacher, EMA teacher + alignment)
set -uo pipefail
OUT=${OUT:-/tmp/ssl-blood-out}
SIZE=${SIZE:-full}
STAGES=${STAGES:-"bench retrieval probe fixmatch"}
DATA=${SSL_BLOOD_DATA_ROOT:?set SSL_BLOOD_DATA_ROOT}
mkdir -p "$OUT"
python3 -c "import torch, json; print(json.dumps({'torch': torch.__version__, 'cuda': torch.cuda.is_available(), 'gpu': torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}))" | tee "$OUT/env.json"

RECIPES=fixmatch-calibrated,fixmatch-ema-teacher,fixmatch-ema-aligned
if [ "$SIZE" = tiny ]; then
  BENCH="--seconds 2 --rounds 1 --warmup 1 --epochs 1 --workers 2"
  RETRIEVAL="--synthetic-n 20000 --real-configs ivf:nlist=32:1,4,16 --configs ivf:nlist=64:1,4,16 --repeats 1"
  PROBE="--smoke"
  ABLATE="--preset quick --candidate tiny=epochs=1;limit=200;backbone=cnn6;knn_every=-1"
  FIXMATCH="--steps 5 --seeds 1 --variants $RECIPES"
else
  BENCH="--seconds 10 --rounds 3"
  RETRIEVAL="--repeats 3 --configs ivf:nlist=4096:8,16,32,64"
  PROBE="--episodes 10 --supervised-epochs 0"
  ABLATE="--preset full --candidates-file experiments/configs/gpu_round1_simclr.txt"
  FIXMATCH="--steps 3000 --seeds 1 --variants $RECIPES"
fi

run() {  # name, command...: time it, keep its log, never abort the script
  local name=$1; shift
  local start=$(date +%s)
  "$@" > "$OUT/$name.log" 2>&1
  local status=$?
  echo "{\"stage\": \"$name\", \"status\": $status, \"seconds\": $(( $(date +%s) - start ))}" | tee -a "$OUT/stages.jsonl"
  tail -n 3 "$OUT/$name.log"
}

for stage in $STAGES; do
  case $stage in
    bench) run bench python3 experiments/bench_pretrain.py --data-root "$DATA" $BENCH --out "$OUT/bench_pretrain.json" ;;
    retrieval) run retrieval python3 experiments/bench_retrieval.py --data-root "$DATA" $RETRIEVAL --out "$OUT/bench_retrieval.json" ;;
    probe) run probe python3 experiments/reproduce.py --data-root "$DATA" --seeds 0 --methods simclr $PROBE \
             --runs /tmp/ssl-blood-runs --out "$OUT/bloodmnist_seed0.json" --docs "$OUT/results_seed0.md" ;;
    ablate) run ablate python3 experiments/ablate.py --data-root "$DATA" $ABLATE --runs /tmp/ssl-blood-ablate \
             --out "$OUT/ablations.json" ;;
    fixmatch) run fixmatch bash -c "python3 -m ssl_blood pretrain --preset quick --out /tmp/ssl-blood-fm \
                && python3 experiments/consistency.py --checkpoint /tmp/ssl-blood-fm/checkpoint.pt $FIXMATCH \
                   --out $OUT/consistency.json --doc $OUT/consistency.md" ;;
    *) echo "unknown stage $stage" >&2 ;;
  esac
done
ls -la "$OUT"
