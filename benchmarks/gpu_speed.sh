#!/bin/bash
# The speed checks of issue 9 on a lent GPU, in one go (about 6-8 minutes on an H200; each step is cut at its own
# limit, so one slow step cannot take the whole device time). Results: benchmarks/RESULTS.md, with the card's name.
#   bash benchmarks/gpu_speed.sh                       # lit_ar alone
#   PEERS=gpu_peers bash benchmarks/gpu_speed.sh       # + VAR-d16 and LlamaGen GPT-B against their own samplers
# PEERS: a folder with unmodified checkouts LlamaGen/ and VAR/ (see benchmarks/peers.py). JSON and logs go to OUT_DIR.
set -u
OUT_DIR=${OUT_DIR:-runs/gpu_speed}; PEERS=${PEERS:-}
mkdir -p "$OUT_DIR"; T0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - T0 ))s] $*" | tee -a "$OUT_DIR/status"; }
step() {  # step NAME SECONDS COMMAND...: run it under a time limit, log it, and say how it ended
  local name=$1 limit=$2; shift 2
  timeout "$limit" "$@" > "$OUT_DIR/$name.log" 2>&1; local rc=$?
  stamp "$name: exit $rc$([ $rc -eq 124 ] && echo " (cut at ${limit}s)")"; tail -n 12 "$OUT_DIR/$name.log"
}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT_DIR/gpu"
# GPU-only tests: FSDP, fp16-mixed with its grad scaler, bf16 on every debug generator, compiled against eager
step gpu_tests 150 python -m pytest -q -m gpu tests/test_gpu.py
# the head and its loss, eager against compiled as one graph, at GPT-B's training shapes
step head_loss 60 python -m benchmarks.head_loss --presets GPT-B --batch 64 --json "$OUT_DIR/head_loss.json"
# compiled bf16 training at the B sizes: MFU against the measured matmul peak (target: 40%)
step train_B 180 python -m benchmarks --size B --families causal scale --what train --train-batch 64 --steps 3 \
  --compile compiled --precision bf16 --json "$OUT_DIR/train_B.json"
# sampling with the blocks' linear weights cast once a call against autocast's per-matmul casts (VAR-d16)
step autocast_linears 90 python -m benchmarks.autocast_linears --json "$OUT_DIR/autocast_linears.json"
if [ -n "$PEERS" ]; then  # lit_ar against the peers' own samplers, token generation only
  # --isolate 0: both sides in one process (a process a side would spend the step's time starting CUDA)
  step peers_var 120 python -m benchmarks.peers --peer-root "$PEERS" --families var --precisions fp32 bf16-autocast \
    --repeat 3 --compile --isolate 0 --json "$OUT_DIR/peers_var.json"
  step peers_llamagen 120 python -m benchmarks.peers --peer-root "$PEERS" --families llamagen --compile \
    --precisions bf16-weights --repeat 3 --json "$OUT_DIR/peers_llamagen.json"
fi
stamp "done"
