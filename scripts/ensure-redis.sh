#!/usr/bin/env bash
# Installs redis-server and redis-cli (the quickstart waits on its PING), and
# openssl (which the TLS test uses to make a certificate), with apt-get
# when missing (Debian/Ubuntu).
set -euo pipefail
if command -v redis-server >/dev/null 2>&1 && command -v redis-cli >/dev/null 2>&1 &&
  command -v openssl >/dev/null 2>&1; then
  exit 0
fi
echo "redis-server, redis-cli or openssl not found: installing them with apt-get" >&2
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq redis-server redis-tools openssl >/dev/null
# Debian starts a system redis on 6379; thr's scripts and tests never use it.
command -v redis-server >/dev/null && command -v redis-cli >/dev/null
