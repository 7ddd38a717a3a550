#!/usr/bin/env bash
# Installs Aider, unmodified, into its own virtualenv (examples/aider/.venv), the way its users run it.
# Needs network access to PyPI once. Usage: examples/aider/install.sh   (AIDER_VERSION=0.86.1 to pin)
set -euo pipefail
cd "$(dirname "$0")"
pick_python() {
    local c
    # aider-chat supports Python 3.10-3.12.
    # Run each candidate: a pyenv shim exists even where its version is not active.
    for c in "${PYTHON:-}" python3.12 python3.11 python3.10 python3 \
             $(ls -d "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.1[0-2]*/bin/python3 2>/dev/null | sort -rV); do
        [ -n "$c" ] && "$c" -c 'import sys; sys.exit(not (3, 10) <= sys.version_info[:2] <= (3, 12))' \
            2>/dev/null && { echo "$c"; return 0; }
    done
    return 1
}
python=$(pick_python) || { echo "no python3 found (set PYTHON=...)" >&2; exit 1; }
"$python" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "aider-chat${AIDER_VERSION:+==$AIDER_VERSION}"
.venv/bin/aider --version
echo "Aider installed in $(pwd)/.venv" >&2
