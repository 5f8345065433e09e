""":"
# LLaDA 8B pretraining (recipes/llada_8b.yaml). This file is both a bash script and a Python
# script, so both commands work:
#   deepspeed [--hostfile H] recipes/llada_8b.sh [section.field=value ...]
#       the launcher runs `python -u recipes/llada_8b.sh --local_rank=N ...` on every rank:
#       the Python part at the bottom trains;
#   [HOSTFILE=H] bash recipes/llada_8b.sh [section.field=value ...]
#       this bash part starts the deepspeed launcher on this file (or, with --dry-run, prints
#       the layout, the memory plan and the DeepSpeed config without starting anything).
set -euo pipefail
self="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")"
if [[ " $* " == *" --dry-run "* ]]; then
  exec python "$self" "$@"
fi
exec deepspeed ${HOSTFILE:+--hostfile "$HOSTFILE"} ${MASTER_PORT:+--master_port "$MASTER_PORT"} \
  "$self" "$@"
":"""
import pathlib
import sys

# the checkout, whatever the working directory
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from pretrain.recipe_entry import run_recipe  # noqa: E402

sys.exit(run_recipe(__file__))
