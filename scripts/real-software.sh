#!/usr/bin/env bash
# thr in front of real software, as a user runs it: a Django app under
# gunicorn (4 sync workers) and a WebSocket server (contrib/real-software),
# driven by headless Chromium (contrib/real-software/browser.js: page and
# assets, SSE, WebSocket, fetch, form upload, download, Django's admin).
# Runs the browser against the app directly, then through thr over
# HTTP/1.1, then through thr over TLS (h2 by ALPN), and prints what
# differs from the direct run, with the timings. Exits 1 on a difference.
# Installs what is missing (apt: chromium, nodejs, npm, python3-venv,
# redis), and Django, gunicorn, playwright-core and ws in a temporary
# directory (a venv and node_modules). A manual check, not part of the
# test suite: it needs a browser and takes a minute.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
scripts/ensure-redis.sh
need=()
command -v chromium >/dev/null || need+=(chromium)
command -v node >/dev/null || need+=(nodejs)
command -v npm >/dev/null || need+=(npm)
python3 -c 'import ensurepip, venv' 2>/dev/null || need+=(python3-venv)
if ((${#need[@]})); then
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi
export CHROMIUM="${CHROMIUM:-$(command -v chromium)}"
cargo build --release -q -p http2redis -p redis2http

dir=$(mktemp -d /tmp/thr-real-XXXXXX)
pids=()
cleanup() {
  for pid in ${pids[@]+"${pids[@]}"}; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$dir"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
# Pip installs into a venv (Debian's own Python refuses system installs).
python3 -m venv "$dir/venv"
"$dir/venv/bin/pip" install -q django gunicorn
(cd "$dir" && npm init -y >/dev/null && npm install -s playwright-core ws >/dev/null)
export NODE_PATH="$dir/node_modules"
read -r redis_port app_port ws_port front_port tls_port < <(python3 -c '
import socket
socks = [socket.socket() for _ in range(5)]
for s in socks: s.bind(("127.0.0.1", 0))
print(*[s.getsockname()[1] for s in socks])')
openssl req -x509 -newkey rsa:2048 -nodes -days 1 -subj /CN=localhost \
  -addext "subjectAltName=IP:127.0.0.1" -keyout "$dir/key.pem" -out "$dir/cert.pem" 2>/dev/null
config() { # LISTEN [TLS LINE]
  cat <<TOML
[redis]
url = "redis://127.0.0.1:$redis_port"
[http2redis]
listen = "127.0.0.1:$1"
${2:-}
[[queues]]
name = "default"
backend = "http://127.0.0.1:$app_port"
max_inflight = 4
[[queues]]
name = "ws"
backend = "http://127.0.0.1:$ws_port"
[[rules]]
when = { path = { prefix = "/ws" } }
then = { queue = "ws" }
TOML
}
config "$front_port" > "$dir/thr.toml"
config "$tls_port" "tls = { cert = \"$dir/cert.pem\", key = \"$dir/key.pem\" }" > "$dir/tls.toml"

app="$repo/contrib/real-software"
redis-server --port "$redis_port" --save '' --appendonly no > "$dir/redis.log" 2>&1 &
pids+=($!)
THR_APP_DATA="$dir" "$dir/venv/bin/python" "$app/app.py"
THR_APP_DATA="$dir" "$dir/venv/bin/python" -m gunicorn --chdir "$app" -w 4 -b "127.0.0.1:$app_port" \
  app:application > "$dir/app.log" 2>&1 &
pids+=($!)
node "$app/ws.js" "$ws_port" > "$dir/ws.log" 2>&1 &
pids+=($!)
# Each server listening within 20 s, or its log and an exit.
listening() { # PORT LOG
  for _ in $(seq 200); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.1
  done
  echo "nothing listens on port $1; $2 says:" >&2
  tail -n 20 "$2" >&2
  exit 1
}
listening "$redis_port" "$dir/redis.log"
listening "$app_port" "$dir/app.log"
listening "$ws_port" "$dir/ws.log"
target/release/redis2http --config "$dir/thr.toml" > "$dir/worker.log" 2>&1 &
pids+=($!)
target/release/http2redis --config "$dir/thr.toml" > "$dir/front.log" 2>&1 &
pids+=($!)
target/release/http2redis --config "$dir/tls.toml" > "$dir/front-tls.log" 2>&1 &
pids+=($!)
listening "$front_port" "$dir/front.log"
listening "$tls_port" "$dir/front-tls.log"

# Each run starts with the admin's files just modified: a cache judges them
# fresh for a tenth of their age, so this gives each run as many
# revalidations (304) to make.
browse() { # NAME URL [WS_URL]
  find "$dir/static" -type f -exec touch {} +
  # In the background, so that a signal ends the run at once (the EXIT
  # trap then stops the browser too).
  node "$app/browser.js" "${@:2}" > "$dir/$1.json" &
  pids+=($!)
  wait $!
}
browse direct "http://127.0.0.1:$app_port" "ws://127.0.0.1:$ws_port"
browse thr "http://127.0.0.1:$front_port"
browse thr-tls "https://127.0.0.1:$tls_port"
python3 - "$dir" <<'PY'
import json, sys
d = sys.argv[1]
runs = {name: json.load(open(f"{d}/{name}.json")) for name in ["direct", "thr", "thr-tls"]}
differ = False
direct = runs["direct"]["checks"]
if "error" in direct or direct.get("failed"):
    print(f"the direct run itself failed: {direct.get('error')} {direct.get('failed')}")
    differ = True
if runs["thr-tls"]["timings"]["protocol"] != "h2":
    print(f"the TLS run did not use h2: {runs['thr-tls']['timings']['protocol']}")
    differ = True
for name, run in runs.items():
    t = run["timings"]
    print(f"{name:8} {t['protocol']:9} page {t['page_ms']:4} ms  download 20 MB {t['download_ms']:4} ms  SSE at {t['sse_ms']} ms  answers {t['statuses']}")
for name in ["thr", "thr-tls"]:
    checks = runs[name]["checks"]
    for key in dict.fromkeys([*runs["direct"]["checks"], *checks]):
        want, got = runs["direct"]["checks"].get(key), checks.get(key)
        if got != want:
            differ = True
            print(f"DIFFERS {name} {key}: {json.dumps(got)} (direct: {json.dumps(want)})")
print("thr differs from the direct run" if differ else "same as direct: " + ", ".join(runs["direct"]["checks"]))
sys.exit(1 if differ else 0)
PY
