#!/usr/bin/env bash
# Refresh constraints.txt: resolve the newest releases that pyproject.toml allows in a
# fresh virtualenv, then freeze them. Run it on purpose (make lock), run `make test`, and
# commit constraints.txt with the result; make, .ci/run and the Dockerfile install with it.
#   scripts/lock.sh [PYTHON]     (default python3; the lock is for that Python's version)
set -euo pipefail
cd "$(dirname "$0")/.."
py=${1:-python3}
venv=$(mktemp -d)/venv
trap 'rm -rf "$(dirname "$venv")"' EXIT
"$py" -m venv "$venv"
TORCH_BUILD=cpu scripts/install_torch.sh "$venv/bin/python"
# every extra that installs on a CPU machine (gpu's flash-attn needs CUDA to build)
"$venv/bin/python" -m pip install -e '.[dev,plot,eval,hf,lora]'
{
  echo "# Pinned versions for pip install -c constraints.txt (make install/dev, .ci/run, Dockerfile)."
  echo "# Made by scripts/lock.sh (make lock) with $("$venv/bin/python" --version) on $(date -u +%Y-%m-%d)."
  # torch's local label (+cpu, +cu128) names the build, which install_torch.sh picks
  "$venv/bin/python" -m pip freeze --exclude-editable | sed -E 's/^(torch==[^+]+)\+.*/\1/'
} > constraints.txt.tmp
mv constraints.txt.tmp constraints.txt
echo "wrote constraints.txt ($(grep -vc '^#' constraints.txt) packages)"
