#!/usr/bin/env bash
# Installs the peer proxies the benchmark compares rollouttap with (LiteLLM's proxy, Agent Lightning's gateway)
# into their own virtualenv, bench/.peers-venv, unmodified. Needs the package registry once (~1 minute).
# Not part of CI or of the test suite: bench/run.py measures the peers only where this venv exists.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=".peers-venv"
ok_python() { "$1" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 12) else 1)' 2>/dev/null; }
pick_python() {
    local c
    # agentlightning 1.0 needs Python >= 3.12. Run each candidate: a pyenv shim exists where its version is not active.
    for c in "${PYTHON:-}" python3.13 python3.12 python3 \
             $(ls -d "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.1[2-9]*/bin/python3 2>/dev/null | sort -rV); do
        [ -n "$c" ] && ok_python "$c" && { echo "$c"; return 0; }
    done
    return 1
}
python=$(pick_python) || { echo "no Python >= 3.12 found (set PYTHON=...)" >&2; exit 1; }
[ -x "$venv/bin/python" ] && ok_python "$venv/bin/python" || "$python" -m venv --clear "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip
"$venv/bin/python" -m pip install -q -r peers/requirements.txt
LITELLM_LOCAL_MODEL_COST_MAP=True "$venv/bin/python" -c "import litellm, agentlightning"
echo "peer proxies installed in $(pwd)/$venv" >&2
