"""What one ComfyUI can run, learned from ComfyUI itself: its node classes and their inputs
(``/object_info``), its model files per folder (``/models``, ``/models/{folder}``), its
devices and versions (``/system_stats``).

A job goes only to a backend that has every node class it names and every file it picks
from a list: in ``/object_info`` a checkpoint, LoRA or VAE input is a list of the files that
backend has, so one check covers node classes and model files alike (and any other list
input, such as a sampler name a newer ComfyUI added).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

# Inputs whose value names a model to load: a backend that ran one recently has it in memory
# (model affinity, scheduler.py).
MODEL_INPUTS = frozenset({"ckpt_name", "unet_name", "model_name", "vae_name", "clip_name", "lora_name",
                          "control_net_name", "upscale_model_name"})


def is_link(value: Any) -> bool:
    return (isinstance(value, list) and len(value) == 2 and isinstance(value[0], str)
            and isinstance(value[1], int) and not isinstance(value[1], bool))


@dataclass
class Capabilities:
    """One backend's capabilities at one time (replaced whole on every refresh)."""
    object_info: dict = field(default_factory=dict)
    models: dict[str, frozenset] = field(default_factory=dict)  # folder -> file names
    system: dict = field(default_factory=dict)  # /system_stats
    learned_at: float = 0.0  # the clock's time
    fingerprint: str = ""

    def __post_init__(self) -> None:
        self.classes = frozenset(self.object_info)
        self._choices: dict[str, dict[str, frozenset]] = {}
        self.fingerprint = self.fingerprint or self._fingerprint()

    @property
    def comfyui_version(self) -> str:
        system = self.system.get("system") if isinstance(self.system.get("system"), dict) else {}
        return str(system.get("comfyui_version", ""))

    @property
    def vram_total(self) -> int:
        devices = self.system.get("devices")
        if isinstance(devices, list):
            return sum(int(d.get("vram_total") or 0) for d in devices if isinstance(d, dict))
        return 0

    def _fingerprint(self) -> str:
        """The environment's identity: ComfyUI's and torch's versions, the node classes, the
        model file names. (Two backends with the same fingerprint give the same output for the
        same prompt, as far as ComfyUI lets us tell: it publishes no file hashes.)"""
        system = self.system.get("system") if isinstance(self.system.get("system"), dict) else {}
        basis = {"comfyui": system.get("comfyui_version"), "torch": system.get("pytorch_version"),
                 "classes": sorted(self.classes), "models": {k: sorted(v) for k, v in sorted(self.models.items())}}
        return hashlib.sha256(json.dumps(basis, sort_keys=True).encode()).hexdigest()[:32]

    def choices(self, class_type: str) -> dict[str, frozenset]:
        """The list inputs of a node class: input name -> the values it accepts."""
        known = self._choices.get(class_type)
        if known is None:
            known = {}
            info = self.object_info.get(class_type)
            inputs = info.get("input") if isinstance(info, dict) else None
            for section in ("required", "optional"):
                specs = inputs.get(section) if isinstance(inputs, dict) else None
                for name, spec in (specs or {}).items() if isinstance(specs, dict) else ():
                    kind = spec[0] if isinstance(spec, (list, tuple)) and spec else None
                    if isinstance(kind, list):  # the classic combo: [[choices...], {...}]
                        known[name] = frozenset(v for v in kind if isinstance(v, (str, int, float)))
                    elif kind == "COMBO" and len(spec) > 1 and isinstance(spec[1], dict) \
                            and isinstance(spec[1].get("options"), list):  # the V3 form
                        known[name] = frozenset(v for v in spec[1]["options"] if isinstance(v, (str, int, float)))
            self._choices[class_type] = known
        return known

    def missing(self, prompt: dict, limit: int = 5) -> list[str]:
        """Why this backend cannot run ``prompt`` (at most ``limit`` reasons; [] if it can)."""
        reasons: list[str] = []
        for node_id, node in prompt.items():
            if not isinstance(node, dict):
                continue
            class_type = node.get("class_type")
            if class_type not in self.classes:
                reasons.append(f"node {node_id}: class {str(class_type)[:64]!r} is not installed")
            else:
                choices = self.choices(class_type)
                inputs = node.get("inputs")
                for name, allowed in choices.items():
                    value = inputs.get(name) if isinstance(inputs, dict) else None
                    if value is not None and not is_link(value) and value not in allowed:
                        reasons.append(f"node {node_id} ({class_type}): {name} {str(value)[:128]!r} is not "
                                       "available")
            if len(reasons) >= limit:
                break
        return reasons


def models_named(prompt: dict) -> frozenset:
    """The model files a prompt loads (the values of its model inputs)."""
    found = set()
    for node in prompt.values():
        inputs = node.get("inputs") if isinstance(node, dict) else None
        if isinstance(inputs, dict):
            for name in MODEL_INPUTS.intersection(inputs):
                value = inputs[name]
                if isinstance(value, str):
                    found.add(value)
    return frozenset(found)


def shape_of(prompt: dict) -> str:
    """What kind of work a prompt is, for learning how long it takes: its node classes and the
    numbers that scale the work (steps, sizes, batch), not its seeds or texts."""
    parts = []
    for node in prompt.values():
        if not isinstance(node, dict):
            continue
        inputs = node.get("inputs") if isinstance(node.get("inputs"), dict) else {}
        sizes = tuple(inputs[k] for k in ("steps", "width", "height", "batch_size", "length")
                      if isinstance(inputs.get(k), int))
        parts.append(f"{node.get('class_type')}{sizes}")
    return hashlib.sha1("|".join(sorted(parts)).encode()).hexdigest()[:16]
