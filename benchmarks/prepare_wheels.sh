#!/usr/bin/env bash
# Wheels for Python 3.12 (x86_64 Linux) of everything the stack needs besides torch, for a GPU
# machine without internet that already has torch (and its CUDA libraries, triton, numpy).
#
#   bash benchmarks/prepare_wheels.sh [OUT_DIR]        # default: build/wheels-py312 (git-ignored)
#
# Run it on a machine with internet where the stack is installed (`bash install.sh`): the
# versions are the ones installed here, pinned in OUT_DIR/requirements.txt: the closure of
# requirements.txt minus torch and what comes with it, the optional lm-eval, and pyarrow (55 MB,
# needed only to prepare Parquet inputs: prepare data elsewhere). About 50 MB in all. Packages
# published as source only (deepspeed) are built into wheels here with `pip wheel --no-deps`
# (pure Python: DeepSpeed's CUDA ops are JIT-built where they run).
# Then on the GPU machine, from the repository root:
#   pip install --no-index --find-links OUT_DIR --no-deps -r OUT_DIR/requirements.txt
#   pip install --no-index --no-deps --no-build-isolation -e .
#   python benchmarks/gpu_smoke.py && python benchmarks/train_step.py
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-build/wheels-py312}
mkdir -p "$OUT"

# The installed distributions that requirements.txt pulls in, pinned; torch's own stack left out.
python - "$OUT/requirements.txt" <<'EOF'
import re
import sys
from importlib import metadata

SKIP = {"torch", "triton", "lm-eval", "pyarrow", "numpy", "setuptools", "pip", "wheel",
        "sympy", "mpmath", "networkx", "jinja2", "markupsafe", "filelock", "fsspec", "typing-extensions"}


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(line: str) -> str:
    return canonical(re.split(r"[ ;<>=!~\[]", line.strip(), maxsplit=1)[0])


todo = [requirement_name(line) for line in open("requirements.txt")
        if line.strip() and not line.lstrip().startswith("#")]
pinned = {}
while todo:
    name = todo.pop()
    if name in pinned or name in SKIP or name.startswith("nvidia-"):
        continue
    try:
        dist = metadata.distribution(name)
    except metadata.PackageNotFoundError:
        continue  # an optional or platform-specific dependency not installed here
    pinned[name] = dist.version
    for req in dist.requires or ():
        if "extra ==" not in req:  # the base dependencies, not the extras
            todo.append(requirement_name(req))
with open(sys.argv[1], "w") as out:
    out.writelines(f"{name}=={version}\n" for name, version in sorted(pinned.items()))
print(f"{len(pinned)} packages pinned in {sys.argv[1]}")
EOF

PLATFORM=(--only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none
          --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64
          --platform manylinux_2_28_x86_64 --platform any)
sources=()
while read -r pin; do
  if ! pip download --quiet --no-deps "${PLATFORM[@]}" -d "$OUT" "$pin" 2>/dev/null; then
    sources+=("$pin")
  fi
done < "$OUT/requirements.txt"
for pin in "${sources[@]}"; do
  echo "no Python 3.12 wheel for $pin: building one from its source"
  DS_BUILD_OPS=0 pip wheel --quiet --no-deps --no-build-isolation -w "$OUT" "$pin"
done
echo "$(ls "$OUT"/*.whl | wc -l) wheels, $(du -sh "$OUT" | cut -f1) in $OUT"
