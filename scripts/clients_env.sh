#!/usr/bin/env bash
# A separate virtual environment for client libraries whose pins clash with the project's own:
# langchain-cohere needs cohere<6, the project's tests use cohere 7.x.
#
#   scripts/clients_env.sh            # create (or reuse) it; prints its python
#
# The environment lives in ~/.cache/r7b-edge/venv-langchain-cohere (override with
# R7B_LANGCHAIN_VENV). The first run needs the package index; later runs reuse what is there and
# work offline. Set PYTHON to choose the interpreter that creates it (default: python3).
set -euo pipefail

VENV="${R7B_LANGCHAIN_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/r7b-edge/venv-langchain-cohere}"
PACKAGES=("langchain-cohere>=0.4,<0.7")

if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "import langchain_cohere" 2>/dev/null; then
    echo "$VENV/bin/python"
    exit 0
fi
mkdir -p "$(dirname "$VENV")"
"${PYTHON:-python3}" -m venv "$VENV" >&2
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "${PACKAGES[@]}" >&2
"$VENV/bin/python" -c "import langchain_cohere" >&2
echo "$VENV/bin/python"
