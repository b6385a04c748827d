#!/usr/bin/env bash
# Counts the instructions Redis runs during a thr-bench run, under
# valgrind's callgrind (apt-get install valgrind): a figure this machine's
# noise cannot blur, unlike µs, so two versions of a script compare in one
# run each. Redis runs about 50 times slower meanwhile, so use it with the
# `scripts` scenario (or a short `--duration`), e.g.
#   scripts/redis-instructions.sh --scenarios scripts --script-jobs 1
# Prints the total, and per job for `scripts` (its warm-up and measured
# rounds: 1,000 rounds of --script-jobs jobs), for thr's scripts and for
# the bare lifecycle it runs as a baseline (crates/thr-bench/bare).
# Options go to thr-bench (default target/release/thr-bench; THR_BENCH to
# use another); REDIS_SERVER chooses the redis-server (one built with
# symbols lets callgrind_annotate name functions in the files left in the
# printed directory).
set -euo pipefail
cd "$(dirname "$0")/.."
bench="${THR_BENCH:-target/release/thr-bench}"
server="$(command -v "${REDIS_SERVER:-redis-server}")"
command -v valgrind >/dev/null || { echo "valgrind not found: apt-get install valgrind" >&2; exit 1; }
dir="$(mktemp -d /tmp/thr-callgrind-XXXXXX)"
# thr-bench kills the Redis it started with SIGKILL, which would leave no
# counts: the wrapper it starts runs Redis in the background, so only the
# wrapper dies and Redis is stopped below with SIGTERM (then callgrind
# writes its file).
cat > "$dir/redis-server" <<EOF
#!/bin/sh
valgrind --tool=callgrind --callgrind-out-file=$dir/callgrind.%p.out "$server" "\$@" 2>>"$dir/valgrind.log" &
echo \$! >> "$dir/pids"
wait
EOF
chmod +x "$dir/redis-server"
THR_REDIS_SERVER="$dir/redis-server" "$bench" "$@" | tee "$dir/bench.out"
while read -r pid; do
  kill -TERM "$pid" 2>/dev/null || true
  while kill -0 "$pid" 2>/dev/null; do sleep 0.2; done
done < "$dir/pids"
total=$(cat "$dir"/callgrind.*.out | awk '/^summary:/ { n += $2 } END { printf "%.0f\n", n }')
echo "Redis ran $total instructions in all, every Redis the run started (callgrind files in $dir)"
jobs=16
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
  case "${args[$i]}" in
    --script-jobs) jobs="${args[$((i + 1))]}" ;;
    --script-jobs=*) jobs="${args[$i]#*=}" ;;
  esac
done
# `scripts` runs on two Redis of its own, thr's scripts on one and the bare
# lifecycle (its baseline) on the other, and prints their ports: each
# count is that of the callgrind file whose command line has its port.
ports=$(sed -n "s/^  Redis ports: thr's scripts \([0-9]*\), the bare lifecycle \([0-9]*\)$/\1 \2/p" "$dir/bench.out")
if [[ -n "$ports" ]]; then
  count() {
    local file
    file=$(grep -l -- "^cmd: .* --port $1 " "$dir"/callgrind.*.out | head -n 1 || true)
    [[ -n "$file" ]] || { echo "no callgrind file for the Redis at port $1" >&2; exit 1; }
    awk '/^summary:/ { n += $2 } END { printf "%.0f\n", n }' "$file"
  }
  read -r thr_port bare_port <<< "$ports"
  thr=$(count "$thr_port")
  bare=$(count "$bare_port")
  echo "per job (1,000 rounds of $jobs jobs): thr's scripts $((thr / (1000 * jobs))), the bare lifecycle $((bare / (1000 * jobs))) instructions (x$(awk -v a="$thr" -v b="$bare" 'BEGIN { printf "%.1f", a / b }'))"
fi
