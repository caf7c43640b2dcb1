#!/usr/bin/env python3
"""Validation cost per node (jobs/validate.py) beside json.loads of the same prompt's text.

    python scripts/bench_validate.py                 # 2,000-node prompts, 30 rounds
    python scripts/bench_validate.py --nodes 2000 --rounds 50

Prompts (model-free node classes; the object_info is a real ComfyUI 0.3.64's, recorded in
tests/validation/object_info_0.3.64.json):

* ``chain``: EmptyImage -> ImageInvert x (N - 2) -> PreviewImage, validated with
  ``max_depth=None`` (all N nodes walked; by default a chain this deep is refused at depth
  1,000, as ComfyUI's recursion refuses it);
* ``fan-in``: N/2 EmptyImage joined pairwise by ImageBatch nodes into one PreviewImage;
* ``outputs``: N/2 EmptyImage -> PreviewImage pairs (N/2 output nodes, each validated apart);
* ``chain, refused``: the chain with its first node's width out of range (the whole
  node_errors answer is built);
* ``outputs, refused``: ``outputs`` with every EmptyImage out of range. ComfyUI names every
  refused output in the ``dependent_outputs`` of every node with errors seen before it, so the
  answer grows with N^2/2 ids (its JSON length is printed); the validator builds it the same.

The baseline, in the same run and process: ``json.loads`` of the prompt's JSON text (the work
every submission costs anyway). Each figure is the median of ``--rounds`` timings, the paths
interleaved. Nothing is asserted.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from comfy_ws_proxy.jobs.validate import validate_prompt  # noqa: E402
from comfy_ws_proxy.testing.prompts import fan_in, long_chain  # noqa: E402


def outputs(pairs: int) -> dict:
    prompt = {}
    for i in range(pairs):
        prompt[str(2 * i + 1)] = {"class_type": "EmptyImage",
                                  "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": i}}
        prompt[str(2 * i + 2)] = {"class_type": "PreviewImage", "inputs": {"images": [str(2 * i + 1), 0]}}
    return prompt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    with open(os.path.join(ROOT, "tests", "validation", "object_info_0.3.64.json")) as f:
        object_info = json.load(f)
    refused = long_chain(args.nodes - 2)
    refused["1"]["inputs"]["width"] = 0
    all_refused = outputs(args.nodes // 2)
    for node in all_refused.values():
        if node["class_type"] == "EmptyImage":
            node["inputs"]["width"] = 0
    prompts = {"chain": long_chain(args.nodes - 2), "fan-in": fan_in(args.nodes // 2),
               "outputs": outputs(args.nodes // 2), "chain, refused": refused, "outputs, refused": all_refused}
    texts = {name: json.dumps(p) for name, p in prompts.items()}
    for name, prompt in prompts.items():  # the verdicts, once
        body = validate_prompt(prompt, object_info, max_depth=None)
        assert (body is None) == ("refused" not in name), name
        if body is not None:
            print(f"{name}: an answer of {len(json.dumps(body)) / 1024:.0f} KB")
    timings: dict = {name: {"validate": [], "json.loads": []} for name in prompts}
    for _ in range(args.rounds):
        for name, prompt in prompts.items():
            t0 = time.perf_counter()
            validate_prompt(prompt, object_info, max_depth=None)
            t1 = time.perf_counter()
            json.loads(texts[name])
            t2 = time.perf_counter()
            timings[name]["validate"].append(t1 - t0)
            timings[name]["json.loads"].append(t2 - t1)
    print(f"validation of {args.nodes}-node prompts, median of {args.rounds} rounds "
          f"(Python {sys.version.split()[0]})")
    print(f"{'prompt':<16}{'nodes':>7}{'KB':>7}{'validate us/node':>18}{'json.loads us/node':>20}{'ratio':>8}")
    for name, prompt in prompts.items():
        n = len(prompt)
        validate = statistics.median(timings[name]["validate"]) / n * 1e6
        loads = statistics.median(timings[name]["json.loads"]) / n * 1e6
        print(f"{name:<16}{n:>7}{len(texts[name]) / 1024:>7.0f}{validate:>18.2f}{loads:>20.2f}{validate / loads:>8.1f}")


if __name__ == "__main__":
    main()
