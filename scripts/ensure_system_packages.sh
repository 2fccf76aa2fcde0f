#!/usr/bin/env bash
# Installs the Debian packages the test suite runs for real, when they are missing:
#   redis-server (storage tests, private servers), prometheus (experiment metrics as Prometheus sees them),
#   chromium (the /experiments page in a headless browser), chromium-driver (the browser SDK's test clicks through
#   WebDriver: tests/sdk/), docker-compose (validates deploy/compose.yaml),
#   haproxy (validates deploy/haproxy.cfg, the proxy in front of the recommend replicas).
set -euo pipefail
declare -A wanted=(
  [redis-server]=redis-server
  [prometheus]=prometheus
  [chromium]=chromium
  [chromedriver]=chromium-driver
  [docker-compose]=docker-compose
  [haproxy]=haproxy
)
missing=()
for command in "${!wanted[@]}"; do
  command -v "$command" >/dev/null 2>&1 || missing+=("${wanted[$command]}")
done
if [[ ${#missing[@]} -eq 0 ]]; then
  exit 0
fi
echo "installing Debian packages: ${missing[*]}" >&2
sudo_cmd=()
[[ $(id -u) -eq 0 ]] || sudo_cmd=(sudo)
export DEBIAN_FRONTEND=noninteractive
"${sudo_cmd[@]}" apt-get update -qq
"${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
# The prometheus package starts a system service on :9090; the tests run their own servers.
if [[ " ${missing[*]} " == *" prometheus "* ]]; then
  "${sudo_cmd[@]}" pkill -x prometheus 2>/dev/null || true
fi
