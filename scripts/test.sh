#!/usr/bin/env bash
# Runs every test of the workspace. The tests start their own redis-server on
# free ports (never 6379), so the only prerequisite is the binary.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/ensure-redis.sh
cargo build --workspace --all-targets
cargo test --workspace "$@"
