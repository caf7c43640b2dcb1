#!/usr/bin/env bash
# Quick start: install into ./.venv, start the proxy (and, without COMFY_URL, the bundled
# ComfyUI SIMULATOR as its backend), run one workflow end to end, then keep serving.
#   ./scripts/quickstart.sh                                   # simulator backend
#   COMFY_URL=http://127.0.0.1:8188 ./scripts/quickstart.sh   # your own ComfyUI
#
# Ports: the proxy on 8190 and the simulator on 8188, unless a port is taken (ComfyUI itself
# listens on 8188): then the next free one, and it says so. PORT=... or SIM_PORT=... insist on
# a port: if it is taken, the script stops, naming what holds it. Each process started is
# checked to be the one listening on its port (not whatever held it) before it is used.
#
# For tests and scripts: QUICKSTART_SKIP_INSTALL=1 (run with $PYTHON as it is),
# QUICKSTART_DIR=DIR (keys, logs and the store; default ./dev), QUICKSTART_EXIT_AFTER_RUN=1
# (stop everything after the end-to-end run instead of serving until Ctrl-C).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
DEV_DIR=${QUICKSTART_DIR:-dev}
PORT_GIVEN=${PORT:+yes}
SIM_PORT_GIVEN=${SIM_PORT:+yes}
PORT=${PORT:-8190}
SIM_PORT=${SIM_PORT:-8188}

if [ -n "${QUICKSTART_SKIP_INSTALL:-}" ]; then
  PY=$PYTHON
else
  echo "==> installing into ./.venv"
  [ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet -e '.[test]'
  PY=.venv/bin/python
fi
mkdir -p "$DEV_DIR"
PORTS=("$PY" scripts/quickstart_ports.py)

pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Both ports chosen before anything starts (a port the user insists on fails fast).
PORT=$("${PORTS[@]}" pick "$PORT" --what "the proxy" ${PORT_GIVEN:+--insist})
if [ -z "${COMFY_URL:-}" ]; then
  SIM_PORT=$("${PORTS[@]}" pick "$SIM_PORT" --what "the simulator" --avoid "$PORT" ${SIM_PORT_GIVEN:+--insist})
fi

if [ -z "${COMFY_URL:-}" ]; then
  echo
  echo "################################################################################"
  echo "#  No COMFY_URL given: starting the bundled ComfyUI SIMULATOR on port $SIM_PORT.  #"
  echo "#  It is a test double, not ComfyUI. Set COMFY_URL to use a real ComfyUI.        #"
  echo "################################################################################"
  echo
  "$PY" -m comfy_ws_proxy.testing.comfyui --port "$SIM_PORT" --node-delay 0.05 > "$DEV_DIR/simulator.log" 2>&1 &
  SIM_PID=$!
  pids+=("$SIM_PID")
  "${PORTS[@]}" wait --pid "$SIM_PID" --port "$SIM_PORT" --url "http://127.0.0.1:$SIM_PORT/system_stats" \
      --what "the simulator" --log "$DEV_DIR/simulator.log"
  echo "==> the simulator listens on http://127.0.0.1:$SIM_PORT (pid $SIM_PID, log $DEV_DIR/simulator.log)"
  export COMFY_URL="http://127.0.0.1:$SIM_PORT"
fi

echo "==> minting a development token for user 'alice' (keys in $DEV_DIR)"
TOKEN=$("$PY" scripts/dev_token.py --sub alice --dir "$DEV_DIR" 2>/dev/null)

echo "==> starting the proxy on port $PORT (conf/dev.py, ComfyUI at $COMFY_URL)"
"$PY" -m comfy_ws_proxy --config conf/dev.py --port "$PORT" --jwt-key-file "$DEV_DIR/dev_jwks.json" \
    --store-path "$DEV_DIR/comfy_ws_proxy.sqlite3" > "$DEV_DIR/proxy.log" 2>&1 &
PROXY_PID=$!
pids+=("$PROXY_PID")
BASE="http://127.0.0.1:$PORT"
"${PORTS[@]}" wait --pid "$PROXY_PID" --port "$PORT" --url "$BASE/health" --what "the proxy" \
    --log "$DEV_DIR/proxy.log"
"${PORTS[@]}" ready --url "$BASE/ready" --hint "; is ComfyUI at $COMFY_URL up? (log: $DEV_DIR/proxy.log)"
echo "==> the proxy listens on $BASE (pid $PROXY_PID, log $DEV_DIR/proxy.log)"

echo "==> running comfy_ws_proxy/testing/workflows/success-ws.json through the proxy"
if ! "$PY" scripts/comfy_client.py --url "ws://127.0.0.1:$PORT/ws" --token "$TOKEN" \
    comfy_ws_proxy/testing/workflows/success-ws.json; then
  echo "quickstart: error: the workflow did not succeed; see $DEV_DIR/proxy.log" >&2
  exit 1
fi

# Say it runs only once it is seen to run.
if ! kill -0 "$PROXY_PID" 2>/dev/null; then
  echo "quickstart: error: the proxy stopped after the run; the end of $DEV_DIR/proxy.log:" >&2
  tail -n 8 "$DEV_DIR/proxy.log" >&2
  exit 1
fi
"${PORTS[@]}" ready --url "$BASE/ready" --url "$BASE/demo"

cat <<INFO

The proxy is running at $BASE (pid $PROXY_PID, logs: $DEV_DIR/proxy.log). Try it yourself:
  the demo page: $BASE/demo (paste a token: $PY scripts/dev_token.py --sub bob --dir $DEV_DIR)
  export COMFY_WS_PROXY_TOKEN=\$($PY scripts/dev_token.py --sub bob --dir $DEV_DIR)
  $PY scripts/comfy_client.py --url ws://127.0.0.1:$PORT/ws comfy_ws_proxy/testing/workflows/success.json
  a template (conf/templates/text2img.json; the list: $BASE/templates) with typed parameters:
  curl -s -H "Authorization: Bearer \$COMFY_WS_PROXY_TOKEN" -H 'Prefer: wait=30' \\
       --data '{"template": "text2img", "params": {"seed": 42, "steps": 8}}' $BASE/generate
  curl -s -H 'Authorization: Bearer dev-metrics-secret' $BASE/metrics
INFO
if [ -n "${QUICKSTART_EXIT_AFTER_RUN:-}" ]; then
  echo "QUICKSTART_EXIT_AFTER_RUN is set: stopping."
  exit 0
fi
echo "Press Ctrl-C to stop."
status=0
wait "$PROXY_PID" || status=$?
echo "quickstart: the proxy exited (status $status); the end of $DEV_DIR/proxy.log:" >&2
tail -n 8 "$DEV_DIR/proxy.log" >&2
exit "$status"
