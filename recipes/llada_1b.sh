""":"
# LLaDA 1B pretraining (recipes/llada_1b.yaml). This file is both a bash script and a Python
# script, so both commands work:
#   deepspeed [--hostfile H] recipes/llada_1b.sh [section.field=value ...]
#       the launcher runs `python -u recipes/llada_1b.sh --local_rank=N ...` on every rank:
#       the Python part at the bottom trains;
#   [HOSTFILE=H] bash recipes/llada_1b.sh [section.field=value ...]
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

recipe = pathlib.Path(__file__).resolve()
sys.path.insert(0, str(recipe.parents[1]))  # the checkout, whatever the working directory
from pretrain.rank_supervisor import supervise  # noqa: E402

supervise()  # under a launcher, a parent process names this rank if it ends badly
from pretrain.train import main  # noqa: E402

sys.exit(main(["--config", str(recipe.with_suffix(".yaml")), *sys.argv[1:]]))
