#!/bin/bash
# Sample quality of the generator families on `shapes` at 32x32 with one GPU: token caches of many distinct images,
# the shipped shapes configs (and the configs/shapes32/ overlays) at a GPU batch, then `lit_ar test` with
# configs/eval/generator_shapes.yaml. The families named in FAMILIES train side by side, one process each; every
# process is stopped by its step budget or by MAXT, whichever comes first. Results: benchmarks/RESULTS.md
# ("Generator sample quality on shapes32 on one GPU"). It needs the 32x32 classifier and the tokenizers that FAMILIES
# use, in RUNS (notebook 01's layout: LIT_AR_TIER=shapes32 LIT_AR_RUN_DIR=runs/nb01 python notebooks/01_family_comparison.py
# trains them on a CPU in about an hour); those missing are first trained here, side by side, with the shipped
# configs and their configs/shapes32/ overlays (a minute or two on a GPU; PREP_ARGS adds arguments to those fits).
#   bash benchmarks/shapes32_gpu.sh                                          # the six families side by side
#   FAMILIES=LlamaGen NTRAIN=100000 STEPS=3500 MAXT=00:00:02:00 bash benchmarks/shapes32_gpu.sh   # one, alone
# Run folders, logs and a one-line summary per family (`status`) go to OUT_DIR.
set -u
FAMILIES=${FAMILIES:-"LlamaGen RAR MaskGIT VAR MAR FlowAR"}
STEPS=${STEPS:-6000}; BATCH=${BATCH:-256}; NTRAIN=${NTRAIN:-40000}; MAXT=${MAXT:-00:00:04:30}; DEVICE=${DEVICE:-cuda}
COMPILE=${COMPILE:-false}  # true: compiled blocks in training (the evaluation samples eager either way)
RUNS=${RUNS:-runs/nb01}  # where the classifier and the three tokenizers were trained
VQ=${VQ:-$RUNS/tokenizer_vq/checkpoints/last.ckpt}
MSVQ=${MSVQ:-$RUNS/tokenizer_msvq/checkpoints/last.ckpt}
KL=${KL:-$RUNS/tokenizer_kl/checkpoints/last.ckpt}
CLASSIFIER=${CLASSIFIER:-$RUNS/classifier/checkpoints/best.ckpt}
REFERENCES=${REFERENCES:-$RUNS/references}  # reference statistics, cached per (data, split, extractor)
OUT_DIR=${OUT_DIR:-runs/shapes32_gpu}; EXTRA_EVAL=${EXTRA_EVAL:-}
mkdir -p "$OUT_DIR"; T0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - T0 ))s] $*" | tee -a "$OUT_DIR/status"; }
D="--data.image_size 32 --data.num_train $NTRAIN --data.num_val 500"
declare -A TOKENIZER=([vq]=$VQ [msvq]=$MSVQ [kl]=$KL)
needs() {  # the tokenizer kind of a family
  case $1 in LlamaGen|RAR|MaskGIT) echo vq ;; VAR) echo msvq ;; MAR|FlowAR) echo kl ;;
    *) echo "FAMILIES names '$1'; accepted: LlamaGen RAR MaskGIT VAR MAR FlowAR" >&2; exit 2 ;; esac; }
for f in $FAMILIES; do needs "$f" > /dev/null || exit 2; done
kinds=$(for f in $FAMILIES; do needs "$f"; done | sort -u)
prep() {  # prep NAME CHECKPOINT CONFIG: train what CHECKPOINT holds with CONFIG and its 32x32 overlay, if missing
  [ -f "$2" ] && return 0
  # shellcheck disable=SC2086  # PREP_ARGS is a list of arguments
  python -m lit_ar fit --config "configs/$3" --config "configs/shapes32/$3" --trainer.enable_progress_bar false \
    --trainer.logger.init_args.save_dir "$(dirname "$(dirname "$2")")" ${PREP_ARGS:-} > "$OUT_DIR/prep_$1.log" 2>&1
  [ -f "$2" ] && stamp "$1 trained: $2" || stamp "$1 failed, no $2: $OUT_DIR/prep_$1.log"; }
prep classifier "$CLASSIFIER" classifier/shapes.yaml &
for k in $kinds; do prep "tokenizer_$k" "${TOKENIZER[$k]}" "tokenizer/${k}_shapes.yaml" & done
wait
for f in "$CLASSIFIER" $(for k in $kinds; do echo "${TOKENIZER[$k]}"; done); do
  [ -f "$f" ] || { stamp "missing $f: stopping"; exit 1; }; done
for k in $kinds; do  # encode every image once (and mirrored): training then reads codes, not pixels
  python -m lit_ar.data.token_cache --tokenizer_ckpt "${TOKENIZER[$k]}" --output "$OUT_DIR/cache_$k" \
    --data.dataset shapes $D --data.num_workers 4 --batch_size 500 --device "$DEVICE" > "$OUT_DIR/cache_$k.log" 2>&1 \
    || stamp "token cache $k failed: $OUT_DIR/cache_$k.log" &
done
wait; stamp "token caches written"
declare -A ARGS=(
  [LlamaGen]="--config configs/causal/llamagen_shapes.yaml --config configs/shapes32/causal/llamagen_shapes.yaml"
  [RAR]="--config configs/causal/rar_shapes.yaml --config configs/shapes32/causal/llamagen_shapes.yaml
         --model.init_args.rar_anneal_start $((STEPS / 4)) --model.init_args.rar_anneal_end $((3 * STEPS / 4))"
  [MaskGIT]="--config configs/masked/maskgit_shapes.yaml --config configs/shapes32/masked/maskgit_shapes.yaml"
  [VAR]="--config configs/scale/var_shapes.yaml --model.init_args.scales null"
  [MAR]="--config configs/flow/mar_shapes.yaml --config configs/shapes32/flow/mar_shapes.yaml"
  [FlowAR]="--config configs/flow/flowar_shapes.yaml --config configs/shapes32/flow/flowar_shapes.yaml"
)
Q="--trainer.enable_progress_bar false --model.init_args.compile false"
for f in $FAMILIES; do
  k=$(needs "$f")
  # shellcheck disable=SC2086  # ARGS and D are lists of arguments
  ( python -m lit_ar fit ${ARGS[$f]} $D $Q --model.init_args.compile "$COMPILE" \
      --model.init_args.tokenizer_ckpt "${TOKENIZER[$k]}" \
      --data.token_cache "$OUT_DIR/cache_$k" --data.batch_size "$BATCH" --data.num_workers 2 \
      --trainer.max_steps "$STEPS" --trainer.max_time "$MAXT" --trainer.logger.init_args.save_dir "$OUT_DIR/$f" \
      > "$OUT_DIR/$f.fit.log" 2>&1
    stamp "$f fit rc=$? $(ls "$OUT_DIR/$f/checkpoints" | grep step)" ) &
done
wait; stamp "training done"
E="--model.init_args.evaluator.init_args."
evaluate() {
  # shellcheck disable=SC2086
  python -m lit_ar test --config "$OUT_DIR/$1/config.yaml" --config configs/eval/generator_shapes.yaml \
    ${E}extractor_ckpt "$CLASSIFIER" ${E}reference_dir "$REFERENCES" $Q $EXTRA_EVAL \
    --trainer.logger.init_args.save_dir "$OUT_DIR/$1" --ckpt_path "$OUT_DIR/$1/checkpoints/last.ckpt" \
    > "$OUT_DIR/$1.eval.log" 2>&1
  stamp "$1 eval rc=$? $(grep -E 'test/(class_accuracy|fid|precision|recall)' "$OUT_DIR/$1.eval.log" | tr -s ' │\n' ' ')"; }
read -r first others <<< "$FAMILIES"
evaluate "$first"  # alone: it computes and caches the reference statistics that the others then read
for f in $others; do evaluate "$f" & done
wait; stamp "evaluation done: $OUT_DIR/<family>/eval/evaluation.json"
