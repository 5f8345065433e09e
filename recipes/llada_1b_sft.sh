""":"
# LLaDA 1B supervised fine-tuning (recipes/llada_1b_sft.yaml): import a released-layout base model,
# fine-tune it on JSONL conversations, export the result (recipes/sft_pipeline.sh):
#   [HOSTFILE=H] bash recipes/llada_1b_sft.sh --base DIR --data TRAIN.jsonl [--heldout HELDOUT.jsonl] \
#       --out RUN_DIR [section.field=value ...]
# This file is both a bash script and a Python script: the deepspeed launcher runs the Python part
# below on every rank (`deepspeed recipes/llada_1b_sft.sh train.init_from=... data.paths=[...]` trains
# without the import and export steps).
set -euo pipefail
self="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")"
exec bash "$(dirname "$self")/sft_pipeline.sh" "$self" "$@"
":"""
import pathlib
import sys

recipe = pathlib.Path(__file__).resolve()
sys.path.insert(0, str(recipe.parents[1]))  # the checkout, whatever the working directory
from pretrain.rank_supervisor import supervise  # noqa: E402

supervise()  # under a launcher, a parent process names this rank if it ends badly
from pretrain.train import main  # noqa: E402

sys.exit(main(["--config", str(recipe.with_suffix(".yaml")), *sys.argv[1:]]))
