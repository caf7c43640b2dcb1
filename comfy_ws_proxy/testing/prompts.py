"""Large API-format prompts made of the simulator's (and a real ComfyUI's) model-free nodes,
for the validator's tests and benchmark."""
from __future__ import annotations


def long_chain(links: int) -> dict:
    """EmptyImage -> ``links`` ImageInvert nodes in a row -> PreviewImage (``links + 2`` nodes)."""
    prompt = {"1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 5}}}
    for i in range(2, links + 2):
        prompt[str(i)] = {"class_type": "ImageInvert", "inputs": {"image": [str(i - 1), 0]}}
    prompt[str(links + 2)] = {"class_type": "PreviewImage", "inputs": {"images": [str(links + 1), 0]}}
    return prompt


def fan_in(leaves: int) -> dict:
    """``leaves`` EmptyImage nodes joined pairwise by ImageBatch nodes into one PreviewImage
    (``2 * leaves`` nodes; every node but the output is the input of another)."""
    prompt: dict = {}
    level = []
    for i in range(leaves):
        prompt[str(i + 1)] = {"class_type": "EmptyImage",
                              "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": i}}
        level.append(str(i + 1))
    next_id = leaves + 1
    while len(level) > 1:
        joined = []
        for a, b in zip(level[0::2], level[1::2]):
            prompt[str(next_id)] = {"class_type": "ImageBatch", "inputs": {"image1": [a, 0], "image2": [b, 0]}}
            joined.append(str(next_id))
            next_id += 1
        if len(level) % 2:
            joined.append(level[-1])
        level = joined
    prompt[str(next_id)] = {"class_type": "PreviewImage", "inputs": {"images": [level[0], 0]}}
    return prompt
