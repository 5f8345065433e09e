#!/usr/bin/env bash
# Supervised fine-tuning from a released-format base model to a released-format chat model, in
# three resumable steps; the SFT recipes (llada_8b_sft.sh, llada_1b_sft.sh, tiny_sft.sh) run it:
#
#   bash recipes/llada_8b_sft.sh --base DIR --data TRAIN.jsonl [--heldout HELDOUT.jsonl] \
#        --out RUN_DIR [section.field=value ...]
#
# 1. import: `pretrain.import_hf` checks the base (config.json, every tensor, the tokenizer)
#    against the recipe and writes RUN_DIR/base (skipped once it exists);
# 2. train: the deepspeed launcher runs the recipe's Python part (Algorithm 2 on the
#    conversations, `train.init_from` RUN_DIR/base) with `--resume auto`, so running the same
#    command again after a preemption continues from the newest checkpoint;
# 3. export: the final checkpoint to RUN_DIR/hf in the released format (skipped while the run
#    is unfinished, and once RUN_DIR/hf exists).
#
# With --dry-run (and --world-size N) it only prints the layout, the memory plan and the
# DeepSpeed config of the training step. Launcher settings come from the environment: HOSTFILE (multi-node), MASTER_PORT, and
# LAUNCHER_ARGS (e.g. "--num_gpus 2" on a CPU machine, where the launcher otherwise starts one
# process).
set -euo pipefail
recipe="$1"; shift
usage="usage: bash $recipe --base DIR --data TRAIN.jsonl [--heldout HELDOUT.jsonl] --out RUN_DIR [section.field=value ...]"
base="" data="" heldout="" out=""
overrides=()
while (($#)); do
  case "$1" in
    --base) base="$2"; shift 2 ;;
    --data) data="$2"; shift 2 ;;
    --heldout) heldout="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    -h|--help) echo "$usage"; exit 0 ;;
    *) overrides+=("$1"); shift ;;
  esac
done
if [[ -z "$base" || -z "$data" || -z "$out" ]]; then
  echo "$usage" >&2
  exit 2
fi
for file in "$data" ${heldout:+"$heldout"}; do
  [[ -f "$file" ]] || { echo "sft: no such conversations file: $file" >&2; exit 2; }
done
config="${recipe%.sh}.yaml"
out="$(mkdir -p "$out" && cd "$out" && pwd)"
data="$(cd "$(dirname "$data")" && pwd)/$(basename "$data")"
run=(train.out_dir="$out" train.init_from="$out/base" data.tokenizer="$out/base/tokenizer.json"
     "data.paths=[\"$data\"]")
if [[ -n "$heldout" ]]; then
  run+=("data.validation_path=$(cd "$(dirname "$heldout")" && pwd)/$(basename "$heldout")")
else
  run+=(validation.elbo_every=0)
fi
if [[ " ${overrides[*]:-} " == *" --dry-run "* ]]; then  # plan the layout and memory only
  exec python "$recipe" "${overrides[@]}" "${run[@]}"
fi

if [[ ! -f "$out/base/imported.json" ]]; then
  python -m pretrain.import_hf --hf "$base" --out "$out/base" --config "$config" "${overrides[@]}" "${run[@]}"
fi
# shellcheck disable=SC2086
deepspeed ${HOSTFILE:+--hostfile "$HOSTFILE"} ${MASTER_PORT:+--master_port "$MASTER_PORT"} ${LAUNCHER_ARGS:-} \
  "$recipe" --resume auto "${overrides[@]}" "${run[@]}"
if [[ ! -e "$out/hf" ]]; then
  python -m pretrain.export_hf --checkpoint "$out/checkpoints" --out "$out/hf" --if-finished
fi
