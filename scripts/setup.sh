#!/usr/bin/env bash
# Installs jaxprune and what it needs on a fresh machine.
#   bash scripts/setup.sh        # runtime + examples (the demo)
#   bash scripts/setup.sh dev    # + test and lint tools
# Also installs Debian's Fashion-MNIST package when run as root with apt-get
# available (the demo falls back to bundled digits without it; compare_criteria.py and
# examples/anp_vs.py need it).
set -euo pipefail
cd "$(dirname "$0")/.."
extra="${1:-examples}"
if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) >/dev/null 2>&1 \
    || echo "note: could not install dataset-fashion-mnist; the demo will use bundled digits"
fi
python -m pip install -q uv 2>/dev/null || python -m pip install -q --user uv
python -m uv pip install -q --python "$(command -v python)" -e ".[${extra}]"
