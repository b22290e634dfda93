#!/usr/bin/env bash
# Rewrite constraints.txt: the exact versions that `pip install torch==2.13.0 && pip install -e ".[test,plot]"`
# resolves today, from a throw-away virtualenv. Run the suite with them (bash .ci/run) before committing.
# Usage: bash tools/refresh-constraints.sh [python]   (default python3)
set -euo pipefail
cd "$(dirname "$0")/.."
python=${1:-python3}
venv=$(mktemp -d)
trap 'rm -rf "$venv"' EXIT

"$python" -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --upgrade pip
"$venv/bin/python" -m pip install --quiet torch==2.13.0      # the CPU build, as .ci/run installs it
"$venv/bin/python" -m pip install --quiet -e ".[test,plot]"
{
    echo "# Exact versions the suite last passed with; install with: pip install -c constraints.txt -e \".[test,plot]\""
    echo "# Refresh: bash tools/refresh-constraints.sh  (pyproject.toml keeps the open ranges)"
    # torch without its local label (+cpu), so the CUDA build of the same version satisfies it too
    "$venv/bin/python" -m pip freeze --exclude-editable | grep -v -i -E '^(reconstruct|pip|setuptools|wheel)[=@ ]' \
        | sed -E 's/^(torch==[^+]+)\+.*/\1/' | LC_ALL=C sort -f
} > constraints.txt
echo "wrote constraints.txt ($(grep -c -v '^#' constraints.txt) packages)"
