#!/usr/bin/env bash
# Quick start: install into ./.venv, start the proxy (and, without COMFY_URL, the bundled
# ComfyUI SIMULATOR as its backend), run one workflow end to end, then keep serving.
#   ./scripts/quickstart.sh                                   # simulator backend
#   COMFY_URL=http://127.0.0.1:8188 ./scripts/quickstart.sh   # your own ComfyUI
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
PORT=${PORT:-8190}
SIM_PORT=${SIM_PORT:-8188}

echo "==> installing into ./.venv"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e '.[test]'
PY=.venv/bin/python
mkdir -p dev

pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT INT TERM

if [ -z "${COMFY_URL:-}" ]; then
  echo
  echo "################################################################################"
  echo "#  No COMFY_URL given: starting the bundled ComfyUI SIMULATOR on port $SIM_PORT.  #"
  echo "#  It is a test double, not ComfyUI. Set COMFY_URL to use a real ComfyUI.        #"
  echo "################################################################################"
  echo
  $PY -m comfy_ws_proxy.testing.comfyui --port "$SIM_PORT" --node-delay 0.05 > dev/simulator.log 2>&1 &
  pids+=($!)
  export COMFY_URL="http://127.0.0.1:$SIM_PORT"
fi

echo "==> minting a development token for user 'alice' (keys in ./dev)"
TOKEN=$($PY scripts/dev_token.py --sub alice 2>/dev/null)

echo "==> starting the proxy on http://127.0.0.1:$PORT (conf/dev.py, ComfyUI at $COMFY_URL)"
$PY -m comfy_ws_proxy --config conf/dev.py --port "$PORT" > dev/proxy.log 2>&1 &
pids+=($!)

for _ in $(seq 1 100); do
  if $PY - "$PORT" <<'PYEOF' 2>/dev/null; then break; fi
import sys, urllib.request
urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/ready", timeout=1)
PYEOF
  sleep 0.2
done

echo "==> running comfy_ws_proxy/testing/workflows/success-ws.json through the proxy"
$PY scripts/comfy_client.py --url "ws://127.0.0.1:$PORT/ws" --token "$TOKEN" \
    comfy_ws_proxy/testing/workflows/success-ws.json

cat <<INFO

The proxy is running (logs: dev/proxy.log). Try it yourself:
  export COMFY_WS_PROXY_TOKEN=\$($PY scripts/dev_token.py --sub bob)
  $PY scripts/comfy_client.py --url ws://127.0.0.1:$PORT/ws comfy_ws_proxy/testing/workflows/success.json
  curl -s -H 'Authorization: Bearer dev-metrics-secret' http://127.0.0.1:$PORT/metrics
Press Ctrl-C to stop.
INFO
wait "${pids[@]}"
