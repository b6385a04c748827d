#!/usr/bin/env bash
# Counts the instructions http2redis, redis2http and Redis run per request
# on an idle system (one request at a time: each job is handed to the
# waiting worker, one per script call), under valgrind's callgrind
# (apt-get install valgrind apache2-utils curl redis-server): a figure this
# machine's noise cannot blur, unlike µs (ARCHITECTURE.md decision 32).
# Starts Redis, the benchmark backend (slowapp, no delay) and both daemons
# in front of it, all three of thr's processes under callgrind, sends N
# sequential keep-alive GETs with `ab` (default 1000), stops them with
# SIGTERM (callgrind then writes its files), then does it all again with
# no request, kept up as long as the first run: the difference, divided
# by N, is what one request costs each, start-up and timers left out.
#   scripts/daemon-instructions.sh [N]
# Uses target/release (build it first; THR_BIN for another directory of
# the same binaries) and the redis-server on PATH (REDIS_SERVER for
# another: one built with symbols lets callgrind_annotate name Redis's
# functions in the files left in the printed directory). Callgrind counts
# each byte of a `rep movsb`/`stosb` (glibc's memcpy and memset of large
# blocks) as an instruction, so a large copy or zeroing weighs more here
# than in time.
set -euo pipefail
cd "$(dirname "$0")/.."
n="${1:-1000}"
[[ "$n" =~ ^[1-9][0-9]*$ ]] || { echo "N must be a number of requests, at least 1" >&2; exit 1; }
bin="${THR_BIN:-target/release}"
server="$(command -v "${REDIS_SERVER:-redis-server}" || true)"
[ -n "$server" ] || { echo "redis-server not found: apt-get install redis-server" >&2; exit 1; }
for tool in valgrind ab curl; do
  command -v "$tool" >/dev/null || { echo "$tool not found: apt-get install valgrind apache2-utils curl" >&2; exit 1; }
done
dir="$(mktemp -d /tmp/thr-daemon-callgrind-XXXXXX)"
# Processes started and not yet waited for: killed if the script fails.
pids=()
cleanup() {
  for pid in "${pids[@]}"; do
    kill -9 "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  pids=()
}
trap cleanup EXIT

# Three distinct ports nothing listens on (a refused connection).
free_ports() {
  local ports=() p
  while [ ${#ports[@]} -lt 3 ]; do
    p=$((20000 + RANDOM % 30000))
    if [[ " ${ports[*]} " != *" $p "* ]] && ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
      ports+=("$p")
    fi
  done
  echo "${ports[@]}"
}

# Stops `pid` with SIGTERM (so that callgrind writes its file), waiting at
# most a minute.
stop() {
  local pid=$1
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 1 600); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  if kill -0 "$pid" 2>/dev/null; then
    echo "process $pid did not stop on SIGTERM (logs in $dir)" >&2
    exit 1
  fi
  wait "$pid" 2>/dev/null || true
}

# One run of $1 requests, kept up at least $3 seconds in all: sets
# `front`, `worker` and `redis` to the instructions each ran, and `took`
# to the seconds the run lasted.
run() {
  local requests=$1 tag=$2 last=$3 redis_port backend_port front_port started
  started=$(date +%s.%N)
  read -r redis_port backend_port front_port < <(free_ports)
  valgrind --tool=callgrind --callgrind-out-file="$dir/callgrind.redis.$tag.out" \
    "$server" --port "$redis_port" --save '' --appendonly no >"$dir/redis.$tag.log" 2>&1 &
  local redis_pid=$!
  pids+=("$redis_pid")
  "$bin/slowapp" --listen "127.0.0.1:$backend_port" --workers 16 --delay 0ms >/dev/null 2>&1 &
  local backend_pid=$!
  pids+=("$backend_pid")
  cat >"$dir/thr.$tag.toml" <<EOF
[redis]
url = "redis://127.0.0.1:$redis_port"
[http2redis]
listen = "127.0.0.1:$front_port"
reply_timeout = "60s"
[[queues]]
name = "default"
backend = "http://127.0.0.1:$backend_port"
max_inflight = 64
EOF
  local daemons=()
  for d in http2redis redis2http; do
    RUST_LOG=warn valgrind --tool=callgrind --callgrind-out-file="$dir/callgrind.$d.$tag.out" \
      "$bin/$d" --config "$dir/thr.$tag.toml" >"$dir/$d.$tag.log" 2>&1 &
    daemons+=($!)
    pids+=($!)
  done
  # Ready when a request comes back through both (each run has this one).
  local ready=""
  for _ in $(seq 1 300); do
    if [ "$(curl -s -m 5 -o /dev/null -w '%{http_code}' "http://127.0.0.1:$front_port/" || true)" = 200 ]; then
      ready=1
      break
    fi
    sleep 0.2
  done
  [ -n "$ready" ] || { echo "thr did not answer (logs in $dir)" >&2; exit 1; }
  if [ "$requests" -gt 0 ]; then
    ab -k -q -n "$requests" -c 1 "http://127.0.0.1:$front_port/" >"$dir/ab.$tag.txt"
    grep -q "^Failed requests: *0" "$dir/ab.$tag.txt" || { echo "requests failed (see $dir/ab.$tag.txt)" >&2; exit 1; }
  fi
  # The run without requests lasts as long as the other, so that what
  # runs on a timer (heartbeats, the reaper, Redis's cron) is subtracted.
  local left
  left=$(awk -v s="$started" -v l="$last" -v now="$(date +%s.%N)" 'BEGIN { print s + l - now }')
  if awk -v x="$left" 'BEGIN { exit !(x > 0) }'; then
    sleep "$left"
  fi
  stop "${daemons[0]}"
  stop "${daemons[1]}"
  stop "$redis_pid"
  # Only the backend is left to kill (the others are waited for: their
  # pids may be another process's by now).
  pids=("$backend_pid")
  cleanup
  took=$(awk -v s="$started" -v now="$(date +%s.%N)" 'BEGIN { print now - s }')
  front=$(awk '/^summary:/ { print $2 }' "$dir/callgrind.http2redis.$tag.out")
  worker=$(awk '/^summary:/ { print $2 }' "$dir/callgrind.redis2http.$tag.out")
  redis=$(awk '/^summary:/ { print $2 }' "$dir/callgrind.redis.$tag.out")
}

run "$n" load 0
front1=$front worker1=$worker redis1=$redis
run 0 idle "$took"
front0=$front worker0=$worker redis0=$redis
echo "per request ($n sequential keep-alive GETs; callgrind files in $dir):"
echo "  http2redis $(((front1 - front0) / n)) instructions"
echo "  redis2http $(((worker1 - worker0) / n)) instructions"
echo "  Redis      $(((redis1 - redis0) / n)) instructions"
