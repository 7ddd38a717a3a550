#!/usr/bin/env bash
# Creates .venv with a Python >= 3.12 found on this machine and installs rollouttap into it.
# Usage: scripts/bootstrap.sh [extras]   (default extras: test,train)
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-test,train}"
venv=".venv"

ok_python() { "$1" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 12) else 1)' 2>/dev/null; }

find_python() {
    local c
    for c in "${ROLLOUTTAP_PYTHON:-}" python3.13 python3.12 python3; do
        [ -n "$c" ] && command -v "$c" >/dev/null 2>&1 && ok_python "$c" && { command -v "$c"; return 0; }
    done
    # pyenv-managed versions, newest first, without relying on the active pyenv version.
    local root="${PYENV_ROOT:-$HOME/.pyenv}"
    for c in $(ls -d "$root"/versions/3.1[2-9]* 2>/dev/null | sort -rV); do
        ok_python "$c/bin/python3" && { echo "$c/bin/python3"; return 0; }
    done
    return 1
}

stamp="$venv/.installed-$extras"
if [ -x "$venv/bin/python" ] && ok_python "$venv/bin/python" && [ -f "$stamp" ] \
   && [ "$stamp" -nt pyproject.toml ]; then
    exit 0
fi
py=$(find_python) || {
    echo "rollouttap needs Python >= 3.12 (mitmproxy 12 requires it)." >&2
    echo "Install python3.12 (or set ROLLOUTTAP_PYTHON=/path/to/python3.12) and run again." >&2
    exit 1
}
echo "bootstrap: using $py ($("$py" -V 2>&1))" >&2
[ -x "$venv/bin/python" ] && ok_python "$venv/bin/python" || "$py" -m venv --clear "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip
# PyPI's torch for Linux is the CUDA build (~6 GB with its nvidia packages); without a GPU (and without vLLM,
# which needs that build) the CPU build from PyTorch's own index is a tenth of it. Where that index cannot be
# reached (a machine that sees only PyPI), PyPI's build is installed below as before.
if [[ ",$extras," == *",train,"* && ",$extras," != *",vllm,"* ]] && ! command -v nvidia-smi >/dev/null 2>&1 \
   && [ ! -e /proc/driver/nvidia ] && ! "$venv/bin/python" -c 'import torch' 2>/dev/null; then
    "$venv/bin/python" -m pip install -q --timeout 20 --retries 1 torch \
        --index-url https://download.pytorch.org/whl/cpu 2>/dev/null \
        || echo "bootstrap: PyTorch's CPU index is out of reach; torch comes from PyPI (its CUDA build)" >&2
fi
"$venv/bin/python" -m pip install -q -e ".[$extras]"
rm -f "$venv"/.installed-*
touch "$stamp"
