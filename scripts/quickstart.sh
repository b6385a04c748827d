#!/usr/bin/env bash
# Runs thr in front of the demo legacy backend, all on this machine:
#   Redis on 127.0.0.1:6390 (private, in a temp dir), slowapp on :9000
#   (4 workers, 50 ms each), redis2http, and http2redis on :8080.
# Then: curl -i http://127.0.0.1:8080/hello     Ctrl-C stops everything.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/ensure-redis.sh
cargo build --release -p http2redis -p redis2http -p slowapp
bin=target/release
dir=$(mktemp -d)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$dir"
}
trap cleanup EXIT INT TERM

redis-server --port 6390 --bind 127.0.0.1 --save "" --appendonly no \
  --dir "$dir" --daemonize no --loglevel warning &
pids+=($!)
"$bin/slowapp" --listen 127.0.0.1:9000 --workers 4 --delay 50ms &
pids+=($!)
"$bin/redis2http" --config config/demo.toml &
pids+=($!)
"$bin/http2redis" --config config/demo.toml &
pids+=($!)
sleep 1
cat <<MSG

thr is running:  http://127.0.0.1:8080  ->  Redis :6390  ->  slowapp :9000
Try:    curl -i 'http://127.0.0.1:8080/hello?cookies=2'
Burst:  for i in \$(seq 50); do curl -s -o /dev/null -w '%{http_code} ' http://127.0.0.1:8080/ & done; wait
Ctrl-C stops everything.
MSG
wait -n "${pids[@]}"
