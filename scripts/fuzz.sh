#!/usr/bin/env bash
# Bounded fuzzing with proptest: the envelope decoder (arbitrary bytes, and
# arbitrary bytes behind a valid header), envelope round trips, and the rule
# and limit matchers (arbitrary patterns of every kind against arbitrary
# values). CASES inputs per target (default 100000); prints executions and
# findings (a failing case is printed, minimized, by proptest).
set -euo pipefail
cd "$(dirname "$0")/.."
CASES="${CASES:-100000}"
targets=(
  envelope::tests::decoder_never_panics
  envelope::tests::any_header_bytes_round_trip
  rules::pattern::tests::arbitrary_patterns_never_panic
  quota::tests::escaped_values_are_key_safe
  quota::tests::escaping_never_collides
)
cargo build --release -p thr-core --tests --quiet
start=$(date +%s)
for t in "${targets[@]}"; do
  t0=$(date +%s)
  if PROPTEST_CASES="$CASES" cargo test --release -q -p thr-core --lib -- --exact "$t" >/tmp/fuzz-$$.log 2>&1; then
    echo "$t: $CASES executions, no finding ($(( $(date +%s) - t0 )) s)"
  else
    echo "$t: FINDING"; cat /tmp/fuzz-$$.log; exit 1
  fi
done
echo "total: $(( ${#targets[@]} * CASES )) executions in $(( $(date +%s) - start )) s, no finding"
rm -f /tmp/fuzz-$$.log
