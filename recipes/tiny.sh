""":"
# The embedded demo (recipes/tiny.yaml) on 2 data-parallel CPU ranks under ZeRO-3: the path of
# the cluster recipes on one machine. This file is both a bash script and a Python script:
#   deepspeed --num_gpus 2 recipes/tiny.sh [section.field=value ...]
#       (on CPU the launcher starts one process unless told the count) runs the Python part
#       below on each rank;
#   bash recipes/tiny.sh [section.field=value ...]
#       starts that launcher command itself.
set -euo pipefail
self="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")"
exec deepspeed --num_gpus 2 ${MASTER_PORT:+--master_port "$MASTER_PORT"} "$self" "$@"
":"""
import pathlib
import sys

# the checkout, whatever the working directory
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from pretrain.recipe_entry import run_recipe  # noqa: E402

# The demo's global batch of 32 as 16 rows per rank: accumulation keeps it at any rank count.
sys.exit(run_recipe(__file__, "train.micro_batch_size=16", "train.out_dir=runs/tiny_2ranks"))
