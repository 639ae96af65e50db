#!/usr/bin/env bash
# A tour of bad input: runs each mistake of the README's "When the input is wrong" list
# against the demo's data and model (run `make demo` first) and prints the line each one
# gives and its exit code. Every case also has a test; this shows them side by side.
#
#   scripts/bad_input_tour.sh            # about a minute on 2 CPU cores
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
export DS_ACCELERATOR=cpu WANDB_MODE=disabled OMP_NUM_THREADS=1
B=.venv/bin
D=runs/demo/data
M=runs/demo/pretrain/export
[[ -f $D/shards/manifest.json && -f $M/config.json ]] ||
  { echo "error: no demo data or model in runs/demo: run make demo first" >&2; exit 2; }
T=$(mktemp -d)
trap 'rm -rf "$T"' EXIT
DATA=(data=demo "data.path=$D/shards" "data.tokenizer=$D/tokenizer.json")
PRETRAIN=("$B/llada-torchrun" --nproc_per_node 2 -m llada_train.cli.pretrain)

# Runs "$@" and prints the case, its exit code and the error lines of its stderr.
show() {
  local name=$1 out rc
  shift
  out=$("$@" 2>&1 >/dev/null)
  rc=$?
  printf '### %s (exit %s)\n%s\n' "$name" "$rc" "$(grep -E '^(error|\[)' <<<"$out" | tail -3)"
}
# A copy of the demo shards with one edit made by python: $1 folder name, $2 the edit.
edited_shards() {
  cp -r "$D/shards" "$T/$1"
  "$B/python" -c "import numpy as np, sys; p = sys.argv[1]; $2" "$T/$1/shard_00000.bin"
}
# A 2-step run whose first checkpoint file is then replaced: $1 run folder, $2 the edit.
edited_checkpoint() {
  "$B/llada-pretrain" "run_dir=$T/$1" "${DATA[@]}" trainer.max_steps=2 trainer.export_at_end=false \
    logging.progress_bar=false >/dev/null 2>&1
  local f
  f=$(find "$T/$1/checkpoints/step_00000002" -name "*.pt" | sort | head -1)
  "$B/python" -c "import pickle, sys; p = sys.argv[1]; $2" "$f"
}

show "config typo" "$B/llada-pretrain" "run_dir=$T/a" "${DATA[@]}" trainer.max_stepz=3
show "wrong type" "$B/llada-pretrain" "run_dir=$T/a" "${DATA[@]}" trainer.max_steps=abc
show "unknown model preset" "$B/llada-pretrain" "run_dir=$T/a" "${DATA[@]}" model=llada_9b
show "+key past the schema" "$B/llada-pretrain" "run_dir=$T/a" "${DATA[@]}" +trainer.max_stepz=3
show "credential-named key" "$B/llada-pretrain" "run_dir=$T/a" "${DATA[@]}" +logging.api_key=abc
show "run_dir not writable" "$B/llada-pretrain" run_dir=/proc/llada "${DATA[@]}"
show "batch sizes that do not divide, 2 ranks" "${PRETRAIN[@]}" "run_dir=$T/b" "${DATA[@]}" trainer.global_batch_size=6 trainer.micro_batch_size=2
show "data vocabulary > model vocabulary, 2 ranks" "${PRETRAIN[@]}" "run_dir=$T/c" data=demo "data.path=$D/shards" data.tokenizer=null model.vocab_size=300
show "missing data path" "$B/llada-pretrain" "run_dir=$T/d" data=demo "data.path=$T/nowhere" "data.tokenizer=$D/tokenizer.json"
edited_shards ids "a = np.fromfile(p, np.uint16); a[5] = 40000; a.tofile(p)"
show "id past the vocabulary in a shard (checksums off)" "$B/llada-pretrain" "run_dir=$T/e" data=demo "data.path=$T/ids" "data.tokenizer=$D/tokenizer.json" trainer.max_steps=3
edited_shards flip "b = bytearray(open(p, 'rb').read()); b[10] ^= 1; open(p, 'wb').write(b)"
show "flipped byte (checksums on), 2 ranks" "${PRETRAIN[@]}" "run_dir=$T/f" data=demo "data.path=$T/flip" "data.tokenizer=$D/tokenizer.json" data.verify_checksums=true trainer.micro_batch_size=8
mkdir -p "$T/pickle" && cp "$M/config.json" "$T/pickle/"
"$B/python" -c "import pickle, sys; open(sys.argv[1], 'wb').write(pickle.dumps({'a': 1}))" "$T/pickle/model.safetensors"
show "init_from: a pickle named model.safetensors" "$B/llada-pretrain" "run_dir=$T/g" "${DATA[@]}" "init_from=$T/pickle"
mkdir -p "$T/wide" && cp "$M/model.safetensors" "$T/wide/"
"$B/python" -c "import json, sys; c = json.load(open(sys.argv[1])); c['mlp_hidden_size'] *= 2; json.dump(c, open(sys.argv[2], 'w'))" "$M/config.json" "$T/wide/config.json"
show "init_from: config.json does not match the weights" "$B/llada-pretrain" "run_dir=$T/h" "${DATA[@]}" "init_from=$T/wide"
show "llada-sft without init_from" "$B/llada-sft" "run_dir=$T/i" data=sft_demo "data.path=$D/sft" "data.tokenizer=$D/tokenizer.json"
show "SFT record longer than the model" "$B/llada-sft" "run_dir=$T/j" data=sft_demo "data.path=$D/sft" "data.tokenizer=$D/tokenizer.json" init_from=none model.max_sequence_length=64 trainer.seq_len=64
mkdir -p "$T/k/checkpoints/step_00000002"
echo '{"step": 2, "world_size": 2, "zero_stage": 2, "mask_draws": "seed-step-index"}' > "$T/k/checkpoints/step_00000002/trainer_state.json"
echo step_00000002 > "$T/k/checkpoints/latest"
show "resume a 2-rank ZeRO-2 checkpoint on 1 rank" "$B/llada-pretrain" "run_dir=$T/k" "${DATA[@]}"
mkdir -p "$T/empty" && : > "$T/empty/a.txt"
show "llada-tokenize on empty input" "$B/llada-tokenize" --input "$T/empty" --tokenizer "$D/tokenizer.json" --out "$T/empty_out" --no-progress
edited_checkpoint l "d = open(p, 'rb').read(); open(p, 'wb').write(d[:1000])"
show "truncated checkpoint file, resume" "$B/llada-pretrain" "run_dir=$T/l" "${DATA[@]}" trainer.max_steps=4
edited_checkpoint m "
class Payload:
    def __reduce__(self): return (open, (sys.argv[1] + '.RAN', 'w'))
open(p, 'wb').write(pickle.dumps(Payload()))"
show "pickle payload in a checkpoint, resume" "$B/llada-pretrain" "run_dir=$T/m" "${DATA[@]}" trainer.max_steps=4
show "pickle payload in a checkpoint, export" "$B/llada-export" --run-dir "$T/m" --out "$T/m_export"
echo "### did the payload run? $(find "$T/m" -name '*.RAN' | grep -q . && echo YES || echo no)"
