#!/usr/bin/env bash
# Runs thr in front of the demo legacy backend, all on this machine, with
# config/demo.toml:
#   Redis on 127.0.0.1:6390 (private, in a temp dir), slowapp on :9000
#   (4 workers, 50 ms each), redis2http (admin :9181), and http2redis on
#   :8080 (admin :9180). Ctrl-C stops everything.
# Builds every binary the README uses (thrctl included) into target/release.
set -euo pipefail
cd "$(dirname "$0")/.."

ports=(6390 9000 8080 9180 9181)
port_taken() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
# Before anything else: a port in use would make a daemon fail half-way
# through, after the build.
for port in "${ports[@]}"; do
  if port_taken "$port"; then
    echo "quickstart: port $port on 127.0.0.1 is in use; the quickstart needs ${ports[*]} free." >&2
    echo "quickstart: stop what listens there (ss -ltnp 'sport = :$port' shows it), then run it again." >&2
    exit 1
  fi
done

bash scripts/ensure-redis.sh
cargo build --release -p http2redis -p redis2http -p thrctl -p slowapp
bin=target/release
dir=$(mktemp -d)
front= worker= backend= redis=

stop() {
  # A second Ctrl-C must not cut the cleanup short.
  trap '' INT TERM
  # Reverse order of start: the daemons let go of Redis before it stops.
  for pid in $front $worker $backend $redis; do
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  rm -rf "$dir"
}
trap stop EXIT
trap 'exit 130' INT TERM

fail() {
  echo "quickstart: $*" >&2
  exit 1
}

# Waits up to 10 s for `check` to succeed while process `pid` lives.
await() {
  local what=$1 pid=$2
  shift 2
  for _ in $(seq 100); do
    kill -0 "$pid" 2>/dev/null || fail "$what exited during start-up (see its output above)"
    if "$@" >/dev/null 2>&1; then return 0; fi
    sleep 0.1
  done
  fail "$what did not become ready within 10 s"
}
ready() {
  (exec 3<>"/dev/tcp/127.0.0.1/$1" && printf 'GET /readyz HTTP/1.0\r\n\r\n' >&3 &&
    read -r -t 2 status <&3 && [[ $status == *" 200 "* ]])
}

# Each runs in a session of its own: Ctrl-C reaches this script only, which
# then stops them in order.
setsid redis-server --port 6390 --bind 127.0.0.1 --save "" --appendonly no \
  --dir "$dir" --daemonize no --loglevel warning &
redis=$!
await "redis-server" "$redis" redis-cli -p 6390 ping
setsid "$bin/slowapp" --listen 127.0.0.1:9000 --workers 4 --delay 50ms &
backend=$!
await "slowapp" "$backend" port_taken 9000
setsid "$bin/redis2http" --config config/demo.toml &
worker=$!
await "redis2http" "$worker" ready 9181
setsid "$bin/http2redis" --config config/demo.toml &
front=$!
await "http2redis" "$front" ready 9180

cat <<MSG

thr is running:  http://127.0.0.1:8080  ->  Redis :6390  ->  slowapp :9000
Try (README "Quickstart" explains each):
  curl -i 'http://127.0.0.1:8080/hello?cookies=2'
  for i in \$(seq 50); do curl -s -o /dev/null -w '%{http_code} ' http://127.0.0.1:8080/ & done; wait
  $bin/thrctl --config config/demo.toml status
  curl -s http://127.0.0.1:9180/metrics | grep thr_requests_total
Ctrl-C stops everything.
MSG
set +e
wait -n "$front" "$worker" "$backend" "$redis"
status=$?
set -e
fail "a process exited (status $status); stopping the rest"
