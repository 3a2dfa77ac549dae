#!/usr/bin/env bash
# One call of a GPU lease for the full model of issue 12 (train.py --size full) and its exact twin
# on the same plan, side by side: adds the carried shards to the corpus kept in /tmp while the
# machine is warm, trains both for MINUTES, and copies one batch of what must come back (the bf16
# Hugging Face folders for multipole-convert, then the checkpoints' parts) into OUT: at most 8
# files and 60 MiB a call, the rest in later calls (FETCH=K). docs/MODEL.md, "Training the full
# model", gives the sequence of calls.
# usage (repository root, GPU machine): tools/train/gpu_lease.sh CORPUS OUT MINUTES
#   CORPUS: a folder with shards.json, tokenizer.model, val_docs.json and some of the shards
#     (train-NNN.u16.xz, val.u16.xz); they join /tmp/lease/corpus, where the shards of earlier
#     calls of this lease stay (CORPUS may be that folder itself: a new run on them)
#   MINUTES: training time of this call (0: none; only gather shards or checkpoint parts, fetch)
# environment:
#   RESUME=1   continue the lease folder (the machine is still warm); without it everything starts
#              afresh. On a fresh machine (the last call's went back after its 30 s idle) the call
#              fails at once instead of gathering shards or waiting for runs that are not there
#   LEASE_DIR  the lease folder (default /tmp/lease)
#   STEPS=N    the plan's length in steps (fixed by the first run; both models get the same)
#   INBOX=DIR  checkpoint parts carried in from an earlier session: DIR/fma_ckpt, DIR/exact_ckpt
#              (manifest.json and some part-NNN each); training waits until each is whole
#   FETCH=K    the outbox batch to copy into OUT (default 0); the call prints how many there are
#   GPU_BUNDLE=DIR  scripts/gpu_bundle.sh's bin/ and lib/, unpacked: each model's Q8_0 GGUF (the
#              file that ships) leads the outbox, in 15 MiB parts with its sha256, so the call that
#              sees a run end brings the model back even if the machine goes back after it
#   MODELS     default "fma exact"; a name fma_TAG or exact_TAG is a variant of its own (its lease
#              folder and outbox entries) whose train.py also gets ARGS_fma_TAG (ARGS_exact_TAG):
#              proxy runs of summary options side by side on one plan (docs/MODEL.md)
#   TRAIN_ARGS to every train.py run (default: the plan of docs/MODEL.md)
#   GPUS=G     processes (GPUs) per model (default 1): torchrun, each with 1/G of every step's
#              windows; with G = 1 and more models than GPUs, model i runs on GPU i mod GPUs
#   DETACH=1   the runs go on after the call returns (setsid: until the machine is given back); later
#              calls keep the machine warm and wait for them (WAIT); their exit codes land in
#              LEASE_DIR/MODEL/exit
#   WAIT=M     wait up to M minutes for detached runs to end (printing their logs each minute); the
#              outbox is made only once every run has ended
#   TESTS=0    skip the tests; SIZE=tiny with TRAIN_ARGS="--device cpu ..." checks the script on a CPU
set -euo pipefail
corpus=$(realpath "$1") out=$(realpath "$2") minutes=$3
inbox_root=${INBOX:+$(realpath "$INBOX")}  # before the cd below: INBOX may be relative
work=${LEASE_DIR:-/tmp/lease}
models=${MODELS:-fma exact}
for m in $models; do
  [[ $m =~ ^(fma|exact)(_[A-Za-z0-9]+)?$ ]] ||
    { echo "gpu_lease: model '$m': fma, exact, fma_TAG or exact_TAG" >&2; exit 2; }
done
export PYTHONUNBUFFERED=1
if [ -z "${RESUME:-}" ]; then
  rm -rf "$work"
elif [ ! -d "$work" ]; then
  echo "gpu_lease: RESUME=1 but $work is not here: this machine is a fresh one (the lease's went" \
    "back), so its shards and runs are lost; start the lease again without RESUME" >&2
  exit 3
fi
mkdir -p "$work/corpus" "$out"
cd tools/train
[ "${TESTS:-1}" = 0 ] || bash gpu_checks.sh test_trainer.py

# The corpus: the files carried now join those of earlier calls; train.py verifies each shard.
# CORPUS may be the lease's own folder (a further run on the shards already here): nothing to copy.
if [ "$corpus" != "$(realpath "$work/corpus")" ]; then cp -f "$corpus"/* "$work/corpus/"; fi
shards=("$work"/corpus/train-*)
echo "corpus: ${#shards[@]} training shards present"

# Checkpoints carried in, part by part over several calls: whole ones become the runs' latest.
for m in $models; do
  inbox=${inbox_root:+$inbox_root/${m}_ckpt}
  if [ -z "$inbox" ] || [ ! -f "$inbox/manifest.json" ]; then continue; fi
  step=$(python3 -c "import json, sys; print(json.load(open(sys.argv[1]))['step'])" "$inbox/manifest.json")
  dest=$work/$m/$(printf 'ckpt-%07d' "$step")
  mkdir -p "$dest" && cp -f "$inbox"/* "$dest/"
  if python3 checkpoint.py verify "$dest"; then
    echo -n "$(basename "$dest")" > "$work/$m/latest"
  else
    echo "$m: checkpoint incomplete; carry the missing parts in the next call (RESUME=1)"
    minutes=0
  fi
done

# Training, both models side by side on the same plan (seed, windows, schedule): each on GPUS
# GPUs of its own where the machine has them all (nvidia-h200-x4: the FMA model and its twin at
# once), else together on the same ones. A model alone on its GPUs takes the largest micro-batch
# that fits; two sharing them, half the batch.
gpus=${GPUS:-1} nmodels=$(wc -w <<< "$models")
ngpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
own=0
if [ "$nmodels" -gt 1 ] && [ "$ngpus" -ge $((nmodels * gpus)) ]; then own=1; fi
micro=0
if [ "$nmodels" -gt 1 ] && [ $own = 0 ]; then micro=8; fi
# shellcheck disable=SC2206 # TRAIN_ARGS is words
plan=(--size "${SIZE:-full}" --seed "${SEED:-0}" ${STEPS:+--plan-steps "$STEPS"} --micro-batch $micro
      ${TRAIN_ARGS:---batch 16 --lr 1.5e-3 --warmup 300 --compile})
# G processes of train.py as torchrun would start them (torchrun itself fails with Debian's
# PyTorch 1.13 under Python 3.11, where this script is checked); the call fails if any does.
ranks() {  # G PORT COMMAND...
  local g=$1 port=$2 pids=() r rc=0
  shift 2
  for ((r = 0; r < g; r++)); do
    RANK=$r LOCAL_RANK=$r WORLD_SIZE=$g MASTER_ADDR=127.0.0.1 MASTER_PORT=$port "$@" &
    pids+=($!)
  done
  for r in "${pids[@]}"; do wait "$r" || rc=1; done
  return $rc
}
export -f ranks
if [ "$minutes" != 0 ]; then
  pids=() i=0 port=$((29500 + RANDOM % 1000))  # a port per model: they may run at once
  for m in $models; do
    twin=() devices='' variant=ARGS_$m
    [[ $m == fma* ]] || twin=(--exact)
    read -r -a extra <<< "${!variant:-}"
    if [ $own = 1 ]; then
      devices=$(seq -s, $((i * gpus)) $((i * gpus + gpus - 1)))
    elif [ "$gpus" = 1 ] && [ "$ngpus" -gt 1 ]; then
      devices=$((i % ngpus))
    fi
    echo "$m: ${gpus} process(es) on GPUs ${devices:-all}"
    mkdir -p "$work/$m" && rm -f "$work/$m/exit"
    run=(ranks "$gpus" $((port + i)) python3 train.py --data "$work/corpus" --out "$work/$m"
         --minutes "$minutes" --final "${plan[@]}" "${twin[@]}" "${extra[@]}")
    i=$((i + 1))
    if [ -n "${DETACH:-}" ]; then
      setsid nohup bash -c "${devices:+export CUDA_VISIBLE_DEVICES=$devices; }$(printf '%q ' \
        "${run[@]}"); echo \$? > $work/$m/exit" \
        > "$work/$m/console.log" 2>&1 < /dev/null &
      echo $! > "$work/$m/pid"
    else
      (if [ -n "$devices" ]; then export CUDA_VISIBLE_DEVICES=$devices; fi; "${run[@]}") &
      pids+=($!)
    fi
  done
  for pid in "${pids[@]}"; do wait "$pid"; done  # a failed run fails the call
fi
if [ -n "${DETACH:-}" ]; then
  deadline=$(( $(date +%s) + ${WAIT:-0} * 60 ))
  while :; do
    running=0
    for m in $models; do
      [ ! -f "$work/$m/exit" ] || continue
      # Neither ended nor alive: never started on this machine, or killed without its exit code
      # (the exit file is looked for again: the run may have ended since the first look).
      if ! kill -0 "$(cat "$work/$m/pid" 2>/dev/null)" 2>/dev/null && [ ! -f "$work/$m/exit" ]; then
        echo "gpu_lease: no run of $m is going here and none ended (was it started, with DETACH=1?)" >&2
        exit 3
      fi
      running=$((running + 1))
    done
    for m in $models; do echo "$m: $(tail -n 1 "$work/$m/train.log" 2>/dev/null)"; done
    if [ "$running" = 0 ] || [ "$(date +%s)" -ge "$deadline" ]; then break; fi
    sleep 60
  done
  for m in $models; do tail -n 5 "$work/$m/console.log" 2>/dev/null || true; done
  [ "$running" = 0 ] || { echo "$running run(s) still going"; exit 0; }
  for m in $models; do
    [ "$(cat "$work/$m/exit")" = 0 ] || { echo "$m: train.py exited with $(cat "$work/$m/exit")"; exit 1; }
  done
fi
for m in $models; do
  [ -f "$work/$m/train.log" ] || continue
  tail -n 4 "$work/$m/train.log"
  cp "$work/$m/train.log" "$out/train_$m.log"
done

# The outbox: per model its Q8_0 GGUF (with GPU_BUNDLE), then the bf16 Hugging Face folder
# (safetensors in 15 MiB pieces), then the checkpoint's parts; batch FETCH of it goes to OUT (with
# the two logs: 6 files left). Sessions 13 and 14 lost a trained model with the machine between
# the call that saw the run end and the next: the shipped file comes first, in that call.
rm -rf "$work/outbox" && mkdir -p "$work/outbox"
for m in $models; do
  [ -d "$work/$m/hf" ] || continue
  q8=$work/$m/q8_0.gguf
  if [ -n "${GPU_BUNDLE:-}" ] && [ ! -f "$q8" ]; then
    bundle=$(realpath "$GPU_BUNDLE")
    cp "$work/corpus/tokenizer.model" "$work/$m/hf/"
    # A failed conversion leaves the bf16 folder and the checkpoint to come back as before.
    if LD_LIBRARY_PATH=$bundle/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH} \
        "$bundle/bin/multipole-convert" "$work/$m/hf" "$q8.tmp" --dtype q8_0 --force > /dev/null; then
      mv "$q8.tmp" "$q8"
    else
      echo "gpu_lease: $m: the Q8_0 conversion failed; the bf16 folder comes back instead" >&2
    fi
  fi
  if [ -f "$q8" ]; then
    mkdir -p "$work/outbox/${m}_q8_0"
    (cd "$work/$m" && sha256sum q8_0.gguf) > "$work/outbox/${m}_q8_0/q8_0.gguf.sha256"
    split -b 15M -d "$q8" "$work/outbox/${m}_q8_0/q8_0.gguf.part"
  fi
  mkdir -p "$work/outbox/${m}_hf"
  cp "$work/$m/hf/config.json" "$work/outbox/${m}_hf/"
  split -b 15M -d "$work/$m/hf/model.safetensors" "$work/outbox/${m}_hf/model.safetensors.part"
done
for m in $models; do
  ck=$(python3 -c "import checkpoint, sys; print(checkpoint.latest(sys.argv[1]) or '')" "$work/$m")
  [ -n "$ck" ] && ln -sfn "$ck" "$work/outbox/${m}_ckpt"
done
srcs=()
for m in $models; do [ -e "$work/outbox/${m}_q8_0" ] && srcs+=("$work/outbox/${m}_q8_0/"); done
for m in $models; do for kind in hf ckpt; do
  [ -e "$work/outbox/${m}_$kind" ] && srcs+=("$work/outbox/${m}_$kind/")
done; done
[ ${#srcs[@]} -gt 0 ] || { echo "nothing to fetch yet"; exit 0; }
python3 checkpoint.py outbox "${FETCH:-0}" "$out" "${srcs[@]}" --reserve 2
ls -la "$out" "$out"/*/
