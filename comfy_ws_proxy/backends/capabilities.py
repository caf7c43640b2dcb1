"""What one ComfyUI can run, learned from ComfyUI itself: its node classes and their inputs
(``/object_info``), its model files per folder (``/models``, ``/models/{folder}``), its
devices and versions (``/system_stats``).

A job goes only to a backend whose ``/object_info`` validates it (jobs/validate.py, given to
the pool): every node class it names is there, and every file it picks from a list, as in
``/object_info`` a checkpoint, LoRA or VAE input is the list of the files that backend has.
One check covers node classes, model files and any other list input alike.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

# Inputs whose value names a model to load: a backend that ran one recently has it in memory
# (model affinity, scheduler.py).
MODEL_INPUTS = frozenset({"ckpt_name", "unet_name", "model_name", "vae_name", "clip_name", "lora_name",
                          "control_net_name", "upscale_model_name"})


@dataclass
class Capabilities:
    """One backend's capabilities at one time (replaced whole on every refresh)."""
    object_info: dict = field(default_factory=dict)
    models: dict[str, frozenset] = field(default_factory=dict)  # folder -> file names
    system: dict = field(default_factory=dict)  # /system_stats
    learned_at: float = 0.0  # the clock's time
    fingerprint: str = ""
    remembered: bool = False  # from the store (as last learned before a restart), not read yet

    def __post_init__(self) -> None:
        self.classes = frozenset(self.object_info)
        self.fingerprint = self.fingerprint or self._fingerprint()

    def to_json(self) -> str:
        return json.dumps({"object_info": self.object_info, "system": self.system,
                           "models": {k: sorted(v) for k, v in self.models.items()}}, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> "Capabilities":
        data = json.loads(text)
        return cls(data["object_info"], {k: frozenset(v) for k, v in data["models"].items()}, data["system"],
                   remembered=True)

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
        """The environment's identity: ComfyUI's, Python's and torch's versions, the devices (two
        GPU models may differ in the last bits), the node classes, the model file names. Two
        backends with the same fingerprint give the same output for the same prompt, as far as
        ComfyUI lets us tell: it publishes no hashes of model files (a file replaced under the
        same name is not seen; the result cache's CACHE_TTL_S bounds that)."""
        system = self.system.get("system") if isinstance(self.system.get("system"), dict) else {}
        devices = self.system.get("devices") if isinstance(self.system.get("devices"), list) else []
        basis = {"comfyui": system.get("comfyui_version"), "python": system.get("python_version"),
                 "torch": system.get("pytorch_version"),
                 "devices": sorted(str(d.get("name")) for d in devices if isinstance(d, dict)),
                 "classes": sorted(self.classes), "models": {k: sorted(v) for k, v in sorted(self.models.items())}}
        return hashlib.sha256(json.dumps(basis, sort_keys=True).encode()).hexdigest()[:32]


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


def work_units(prompt: dict) -> float:
    """A prompt's work, roughly, for the scheduler's first guesses: its sampler steps (each
    ``steps`` input, times its batch where one is given; at least 1)."""
    steps = 0
    for node in prompt.values():
        inputs = node.get("inputs") if isinstance(node, dict) else None
        if isinstance(inputs, dict) and isinstance(inputs.get("steps"), int) and not isinstance(inputs["steps"], bool):
            steps += max(0, min(inputs["steps"], 10_000))
    return float(max(1, steps))
