#!/usr/bin/env bash
# The whole objectives bench in one call on a borrowed GPU machine (issue 11): choose each
# objective's knobs on the dev split, then run the chosen ones with the anchor off and on over three
# seeds on the held-out eval split, for monet-cat (16 iterations) and resolution (20), many runs at
# once (a toy run leaves the GPU mostly idle). Every run is a resumable run directory under $ROOT;
# what a deadline stops is reported as incomplete, never as a result.
#
#   ROOT=/tmp/objectives OUT=/tmp/out EVAL_JOBS=12 BUDGET=560 bash bench/gpu_objectives.sh
#
# BUDGET (seconds) bounds the whole script; the dev stage gets DEV_SHARE percent of it.
# Results: $OUT/objectives-*.json, $OUT/logs.tar.gz (per-run logs, metrics, configs).
set -u
ROOT=${ROOT:-/tmp/objectives}
OUT=${OUT:-/tmp/out}
EVAL_JOBS=${EVAL_JOBS:-12}
BUDGET=${BUDGET:-560}
DEV_SHARE=${DEV_SHARE:-40}
PY=${PYTHON:-python3}
SET=${SET:---set generation.batch_size=96}
MONET_IT=${MONET_IT:-16}
RES_IT=${RES_IT:-20}
EVERY=${EVERY:-4}
mkdir -p "$ROOT" "$OUT"
$PY -c "import diffusers, open_clip, pydantic, raft_diffusion.train, torch; print(\"cuda\", torch.cuda.is_available())" || exit 1
start=$(date +%s)
left() { echo $(( BUDGET - ($(date +%s) - start) )); }
bench() { $PY bench/objectives.py --root "$ROOT" $SET "$@"; }

# Many small processes on one GPU: MPS lets their kernels run side by side; without it, or if a
# CUDA client fails under it, the runs share the GPU by time slices.
if command -v nvidia-cuda-mps-control >/dev/null && nvidia-cuda-mps-control -d 2>/dev/null; then
  if timeout 60 $PY -c "import torch; print('mps client ok', torch.ones(4, device='cuda').sum().item())"; then
    echo "MPS on"
  else
    echo quit | nvidia-cuda-mps-control; echo "MPS off (client failed)"
  fi
fi

# Dev: one seed, each objective at several settings (anchor off); monet-cat's value at iteration 4
# also chooses the 4-iteration demo.
MONET_DEV=(raft "raft:ema_decay=0.9" "raft:learning_rate=0.0003" "raft:learning_rate=0.002"
           "reward_weighted:beta=0.5" "reward_weighted:beta=0.25" "reward_weighted:beta=0.5,epochs=1"
           "reward_weighted:beta=0.25,epochs=2"
           "negative_aware:ema_decay=0.9" "negative_aware:ema_decay=0.9,epochs=1"
           "negative_aware:ema_decay=0.5,epochs=2" "negative_aware:ema_decay=0.9,beta=0.5,epochs=2")
RES_DEV=(raft "raft:learning_rate=0.0003" "reward_weighted:beta=0.5,epochs=2" "negative_aware:ema_decay=0.9,epochs=2")
dev_deadline=$(( BUDGET * DEV_SHARE / 100 - 60 ))
echo "== dev stage: ${#MONET_DEV[@]} + ${#RES_DEV[@]} runs, start deadline ${dev_deadline}s"
bench --task monet-cat --split dev --seeds 0 --anchors 0 --iterations "$MONET_IT" --every "$EVERY" --variants "${MONET_DEV[@]}" \
      --jobs 12 --deadline "$dev_deadline" --grace 60 --out "$OUT/objectives-monet-cat-dev.json" \
      > "$OUT/dev-monet-cat.txt" 2>&1 &
bench --task resolution --split dev --seeds 0 --anchors 0 --iterations "$RES_IT" --every "$EVERY" --variants "${RES_DEV[@]}" \
      --jobs 4 --deadline "$dev_deadline" --grace 60 --out "$OUT/objectives-resolution-dev.json" \
      > "$OUT/dev-resolution.txt" 2>&1 &
wait
echo "== dev stage done at $(( $(date +%s) - start ))s"
MONET_PICK=$($PY bench/objectives.py --pick "$OUT/objectives-monet-cat-dev.json")
RES_PICK=$($PY bench/objectives.py --pick "$OUT/objectives-resolution-dev.json")
echo "picked monet-cat: $MONET_PICK"
echo "picked resolution: $RES_PICK"

eval_deadline=$(( $(left) - 150 ))
echo "== eval stage: start deadline ${eval_deadline}s"
bench --task monet-cat --split eval --seeds 0 1 2 --anchors 0 1 --iterations "$MONET_IT" --every "$EVERY" --variants $MONET_PICK \
      --jobs "$EVAL_JOBS" --deadline "$eval_deadline" --grace 100 --out "$OUT/objectives-monet-cat-eval.json" \
      > "$OUT/eval-monet-cat.txt" 2>&1 &
bench --task resolution --split eval --seeds 0 1 2 --anchors 0 1 --iterations "$RES_IT" --every "$EVERY" --variants $RES_PICK \
      --jobs "$EVAL_JOBS" --deadline "$eval_deadline" --grace 100 --out "$OUT/objectives-resolution-eval.json" \
      > "$OUT/eval-resolution.txt" 2>&1 &
wait
echo "== eval stage done at $(( $(date +%s) - start ))s"
tar czf "$OUT/logs.tar.gz" --exclude='*.png' --exclude=checkpoints --exclude='*.safetensors' -C "$ROOT" .
ls -la "$OUT"
