#!/usr/bin/env bash
# The GPU kit's one entry command (docs/gpu-kit.md). On the lent GPU machine:
#   bash benchmarks/gpu/run.sh                 # pip-installs into a venv from the carried wheels, builds, measures (8 min)
#   bash benchmarks/gpu/run.sh --dry-run       # here: the same plumbing on the CPU (~2 min)
# Options go to benchmarks/gpu/run_kit.py (--help). Results: $OUT/gpu_kit.json, .md and .log.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec "${PYTHON:-python3}" benchmarks/gpu/run_kit.py "$@"
