#!/usr/bin/env python3
"""Record a real ComfyUI's answers to tests/validation/cases.json (POST /prompt each case)
and the part of its /object_info those cases use, for tests/test_validate.py.

Start the ComfyUI with PYTHONHASHSEED=0: the order of its node_errors follows its set
orders, which the tests rebuild from the hashes of a seed-0 process. Accepted cases are
queued and run (all are model-free and tiny). Tracebacks (server paths) are emptied.

    PYTHONHASHSEED=0 PORT=8297 ../shared/comfyui/start-real-comfyui.sh
    python scripts/record_validation.py --url http://127.0.0.1:8297
"""
from __future__ import annotations

import argparse
import json
import os
import urllib.error
import sys
import urllib.request

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

from comfy_ws_proxy.testing.prompts import long_chain  # noqa: E402

HERE = os.path.join(ROOT, "tests", "validation")
WORKFLOWS = os.path.join(ROOT, "comfy_ws_proxy", "testing", "workflows")


def case_prompt(name: str, case: dict) -> dict:
    if name.startswith("chain:"):
        return long_chain(int(name.split(":")[1]))
    return case["prompt"]


def post(url: str, body: dict) -> tuple[int, object]:
    request = urllib.request.Request(url + "/prompt", json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as e:
        data = e.read()
        try:
            return e.code, json.loads(data)
        except ValueError:
            return e.code, data.decode("utf-8", "replace")


def empty_tracebacks(value):
    if isinstance(value, dict):
        return {k: ([] if k == "traceback" else empty_tracebacks(v)) for k, v in value.items()}
    if isinstance(value, list):
        return [empty_tracebacks(v) for v in value]
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8188")
    args = parser.parse_args()
    with open(os.path.join(HERE, "cases.json")) as f:
        cases = json.load(f)
    with urllib.request.urlopen(args.url + "/object_info", timeout=60) as answer:
        object_info = json.loads(answer.read())
    with urllib.request.urlopen(args.url + "/system_stats", timeout=60) as answer:
        version = json.loads(answer.read())["system"]["comfyui_version"]
    used = set()
    with open(os.path.join(HERE, f"real_{version}.jsonl"), "w") as out:
        for name, case in cases.items():
            prompt = case_prompt(name, case)
            used.update(n.get("class_type") for n in prompt.values() if isinstance(n, dict)
                        and isinstance(n.get("class_type"), str))
            body = {"prompt": prompt}
            if "partial_execution_targets" in case:
                body["partial_execution_targets"] = case["partial_execution_targets"]
            status, answer = post(args.url, body)
            if isinstance(answer, dict):
                answer.pop("prompt_id", None)
                answer.pop("number", None)
            out.write(json.dumps({"case": name, "status": status, "body": empty_tracebacks(answer)}) + "\n")
            print(name, status)
    for name in os.listdir(WORKFLOWS):
        with open(os.path.join(WORKFLOWS, name)) as f:
            used.update(n["class_type"] for n in json.load(f).values())
    trimmed = {name: object_info[name] for name in sorted(used) if name in object_info}
    with open(os.path.join(HERE, f"object_info_{version}.json"), "w") as f:
        json.dump(trimmed, f, indent=0)
    print(f"{len(cases)} cases, {len(trimmed)} classes of {len(object_info)}")


if __name__ == "__main__":
    main()
