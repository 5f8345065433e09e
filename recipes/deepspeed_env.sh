#!/bin/bash
# Writes .deepspeed_env: the environment the ranks on other nodes need when the deepspeed
# launcher starts them over ssh (pdsh), i.e. for `deepspeed --hostfile H recipes/llada_8b.sh`:
#   bash recipes/deepspeed_env.sh [DIR]      # DIR: where you run deepspeed (default: here)
# The launcher reads ./.deepspeed_env (or ~/.deepspeed_env, or the file DS_ENV_FILE names) and
# exports every KEY=VALUE line on each node. It already forwards PYTHON* and NCCL_* variables
# by itself, but not the virtual environment, TORCH_NCCL_* or CUDA_* settings; this file holds
# them all, from the current shell:
#   PATH (with the active virtual environment's bin first), VIRTUAL_ENV, PYTHONPATH (this
#   checkout first), and every set NCCL_*, TORCH_NCCL_*, TORCH_DISTRIBUTED_DEBUG, CUDA_*,
#   PYTORCH_CUDA_ALLOC_CONF, OMP_NUM_THREADS, LD_LIBRARY_PATH, HF_* and DS_* variable.
# The other nodes must hold the same paths (the same checkout and virtual environment on a
# shared file system, or installed at the same place). Under SLURM, recipes/slurm_llada.sbatch
# starts the launchers with srun, which carries the whole environment; this file is not needed.
set -euo pipefail
out_dir=${1:-.}
checkout=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

{
  echo "PATH=${VIRTUAL_ENV:+$VIRTUAL_ENV/bin:}$PATH"
  [[ -n "${VIRTUAL_ENV:-}" ]] && echo "VIRTUAL_ENV=$VIRTUAL_ENV"
  echo "PYTHONPATH=$checkout${PYTHONPATH:+:$PYTHONPATH}"
  forwarded='^(NCCL_|TORCH_NCCL_|TORCH_DISTRIBUTED_DEBUG=|CUDA_|PYTORCH_CUDA_ALLOC_CONF=|OMP_NUM_THREADS='
  forwarded+='|LD_LIBRARY_PATH=|HF_|DS_)'
  # CUDA_VISIBLE_DEVICES is the launcher's to set on each node.
  env | grep -E "$forwarded" | grep -v '^CUDA_VISIBLE_DEVICES=' | sort || true
} > "$out_dir/.deepspeed_env.tmp"
mv "$out_dir/.deepspeed_env.tmp" "$out_dir/.deepspeed_env"
echo "wrote $out_dir/.deepspeed_env ($(wc -l < "$out_dir/.deepspeed_env") variables)"
