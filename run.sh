#!/usr/bin/env bash
# Main job: sets up what it needs, then runs run_pipeline.py (the demo when no arguments are given).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
bash "$ROOT/scripts/bootstrap.sh"
cd "$ROOT"
exec "$ROOT/.venv/bin/python" "$ROOT/run_pipeline.py" "$@"
