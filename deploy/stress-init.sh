#!/usr/bin/env bash
# Stress for issue 16's init-cluster race: many `init-cluster` runs on fresh nodes beside CPU
# hogs (not part of `make test`, which runs 20 without hogs). Usage: deploy/stress-init.sh [RUNS] [HOGS]
set -euo pipefail
cd "$(dirname "$0")/.."
HERD_T93_RUNS="${1:-200}" HERD_T93_HOGS="${2:-8}" \
  cargo test --test cluster t93_init_race -- --nocapture
