#!/usr/bin/env python3
"""Submit a workflow through comfy_ws_proxy, show its progress, print the output images.

    python scripts/comfy_client.py --token "$(python scripts/dev_token.py --sub alice)" \
        comfy_ws_proxy/testing/workflows/success.json
"""
import argparse
import asyncio
import json
import os
import struct
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from comfy_ws_proxy.client import ProxyClient, ProxyError  # noqa: E402


def bar(done: int, total: int, width: int = 30) -> str:
    filled = int(width * done / total) if total else width
    return "[" + "#" * filled + "-" * (width - filled) + f"] {done}/{total}"


async def run(args) -> int:
    with open(args.workflow, encoding="utf-8") as f:
        workflow = json.load(f)
    total_nodes = len(workflow)
    try:
        async with ProxyClient(args.url, args.token) as client:
            handle = await client.submit(workflow)
            queued = " (queued in the proxy: ComfyUI is unavailable)" if handle.accepted.get("queued") else ""
            print(f"prompt {handle.prompt_id} accepted{queued}", flush=True)
            finished_nodes: set = set()
            previews = 0
            async for event in handle.events():
                if isinstance(event, bytes):
                    previews += 1
                    kind = struct.unpack(">I", event[:4])[0] if len(event) >= 4 else None
                    if kind in (1, 4):
                        sys.stderr.write(f"\r  preview {previews} ({len(event)} bytes)".ljust(60) + "\n")
                    continue
                kind, data = event.get("type"), event.get("data", {})
                if kind == "execution_cached":
                    finished_nodes.update(data.get("nodes", []))
                elif kind == "progress_state":
                    finished_nodes.update(n for n, s in data.get("nodes", {}).items() if s.get("state") == "finished")
                elif kind == "progress":
                    sys.stderr.write(f"\r  node {data.get('node')}: {bar(data['value'], data['max'])}".ljust(60))
                if kind in ("progress_state", "execution_cached", "executing"):
                    sys.stderr.write(f"\r{bar(len(finished_nodes), total_nodes)} nodes".ljust(60))
                sys.stderr.flush()
            result = await handle.result()
            sys.stderr.write("\n")
    except ProxyError as e:
        print(f"error: {e.code}: {e.data.get('message')}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"error: cannot reach the proxy at {args.url}: {e}", file=sys.stderr)
        return 1
    print(f"prompt {result.prompt_id}: {result.status}")
    if result.error:
        print(json.dumps(result.error, indent=2)[:2000])
    for node_id, output in sorted(result.outputs.items()):
        for image in (output or {}).get("images", []):
            folder = f"{image['subfolder']}/" if image.get("subfolder") else ""
            print(f"  node {node_id}: {image.get('type')}/{folder}{image.get('filename')}")
    return 0 if result.status == "success" else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("workflow", help="an API-format workflow JSON file")
    parser.add_argument("--url", default="ws://127.0.0.1:8190/ws")
    parser.add_argument("--token", default=os.environ.get("COMFY_WS_PROXY_TOKEN"), required=False,
                        help="a JWT (or set COMFY_WS_PROXY_TOKEN)")
    args = parser.parse_args()
    if not args.token:
        parser.error("--token is required (mint one with scripts/dev_token.py --sub alice)")
    return asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
