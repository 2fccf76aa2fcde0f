#!/usr/bin/env bash
# Runs a command with REDIS_URL pointing at a reachable Redis:
#   1. REDIS_URL if it is set and answers PING;
#   2. else 127.0.0.1:6379 if it answers;
#   3. else a private redis-server on a free port (Debian's package is installed if missing),
#      stopped again when the command ends.
set -euo pipefail

ping_url() {
  python3 - "$1" <<'PY'
import socket, sys, urllib.parse
u = urllib.parse.urlparse(sys.argv[1])
try:
    with socket.create_connection((u.hostname or "127.0.0.1", u.port or 6379), timeout=1) as s:
        s.sendall(b"PING\r\n")
        sys.exit(0 if s.recv(16).startswith(b"+PONG") else 1)
except OSError:
    sys.exit(1)
PY
}

if [[ -n "${REDIS_URL:-}" ]] && ping_url "$REDIS_URL"; then
  exec "$@"
fi
if ping_url "redis://127.0.0.1:6379/0"; then
  export REDIS_URL="redis://127.0.0.1:6379/0"
  exec "$@"
fi

if ! command -v redis-server >/dev/null; then
  echo "redis-server not found: installing Debian's redis-server package" >&2
  if [[ $(id -u) -eq 0 ]]; then apt-get update -qq && apt-get install -y -qq redis-server >/dev/null;
  else sudo apt-get update -qq && sudo apt-get install -y -qq redis-server >/dev/null; fi
fi
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
dir=$(mktemp -d)
redis-server --port "$port" --bind 127.0.0.1 --save "" --appendonly no --dir "$dir" --daemonize yes \
  --pidfile "$dir/redis.pid" --logfile "$dir/redis.log"
trap 'kill "$(cat "$dir/redis.pid")" 2>/dev/null || true; rm -rf "$dir"' EXIT
for _ in $(seq 50); do ping_url "redis://127.0.0.1:$port/0" && break; sleep 0.1; done
export REDIS_URL="redis://127.0.0.1:$port/0"
echo "started a private redis-server on port $port" >&2
"$@"
