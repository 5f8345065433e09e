""":"
# LLaDA 8B supervised fine-tuning (recipes/llada_8b_sft.yaml): import a released-format base model,
# fine-tune it on JSONL conversations, export the result (recipes/sft_pipeline.sh):
#   [HOSTFILE=H] bash recipes/llada_8b_sft.sh --base DIR --data TRAIN.jsonl [--heldout HELDOUT.jsonl] \
#       --out RUN_DIR [section.field=value ...]
# This file is both a bash script and a Python script: the deepspeed launcher runs the Python part
# below on every rank (`deepspeed recipes/llada_8b_sft.sh train.init_from=... data.paths=[...]` trains
# without the import and export steps).
set -euo pipefail
self="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")"
exec bash "$(dirname "$self")/sft_pipeline.sh" "$self" "$@"
":"""
import pathlib
import sys

# the checkout, whatever the working directory
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from pretrain.recipe_entry import run_recipe  # noqa: E402

sys.exit(run_recipe(__file__))
