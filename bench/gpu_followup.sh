#!/usr/bin/env bash
# Second GPU call of the objectives bench (issue 11): what the first call (bench/gpu_objectives.sh)
# left out or cut short. Plain RAFT (the default, the reference row) on both tasks' eval split; the
# three eval runs its deadline stopped, anew; two more resolution dev settings; TRL DDPO's peer row.
# All at once; everything stops at KILL seconds and what finished is tarred into $OUT.
set -u
ROOT=${ROOT:-/tmp/objectives}; OUT=${OUT:-/tmp/out}; PY=${PYTHON:-python3}; KILL=${KILL:-230}
SET=${SET:---set generation.batch_size=96}
MONET_IT=${MONET_IT:-16}; RES_IT=${RES_IT:-20}; EVERY=${EVERY:-4}
mkdir -p "$ROOT" "$OUT"
if command -v nvidia-cuda-mps-control >/dev/null && nvidia-cuda-mps-control -d 2>/dev/null; then echo "MPS on"; fi
b() { local name=$1; shift; $PY bench/objectives.py --root "$ROOT" $SET --jobs 8 --deadline 30 --grace "$KILL" \
        --out "$ROOT/$name.json" "$@" > "$OUT/$name.txt" 2>&1 & }
b monet-raft --task monet-cat --split eval --seeds 0 1 2 --anchors 0 1 --iterations "$MONET_IT" --every "$EVERY" --variants raft
b res-raft --task resolution --split eval --seeds 0 1 2 --anchors 0 1 --iterations "$RES_IT" --every "$EVERY" --variants raft
b monet-na1 --task monet-cat --split eval --seeds 2 --anchors 1 --iterations "$MONET_IT" --every "$EVERY" \
  --variants "negative_aware:ema_decay=0.5,epochs=2"
b res-na0 --task resolution --split eval --seeds 2 --anchors 0 --iterations "$RES_IT" --every "$EVERY" \
  --variants "negative_aware:ema_decay=0.9,epochs=2"
b res-rw1 --task resolution --split eval --seeds 2 --anchors 1 --iterations "$RES_IT" --every "$EVERY" \
  --variants "reward_weighted:beta=0.5,epochs=2"
b res-dev --task resolution --split dev --seeds 0 --anchors 0 --iterations "$RES_IT" --every "$EVERY" \
  --variants "negative_aware:ema_decay=0.5,epochs=2" "raft:ema_decay=0.9"
for s in 0 1 2; do
  OMP_NUM_THREADS=1 timeout "$KILL" $PY bench/ddpo.py --split eval --seeds $s --iterations "$MONET_IT" \
    --every "$EVERY" --root "$ROOT" --threads 1 ${DDPO_SET:-} > "$OUT/ddpo-seed$s.txt" 2>&1 &
done
wait
echo "all stopped"
tar czf "$OUT/logs.tar.gz" --exclude='*.png' --exclude=checkpoints --exclude='*.safetensors' -C "$ROOT" .
cd "$OUT" && tar czf texts.tar.gz *.txt && rm -f -- *.txt && ls -la
