"""A ComfyUI 0.3.64 simulator: a test double that behaves like ComfyUI on the wire.

It is a Tornado application that runs in-process on the current IOLoop (tests) or
standalone (``python -m comfy_ws_proxy.testing.comfyui --port 8188``). It is held against
the recordings of a real ComfyUI 0.3.64 in ``shared/comfyui/transcripts`` (see
``tests/test_simulator.py``); where those recordings and ``PROTOCOL.md`` disagree, the
recordings win.

Faithful to the recordings
--------------------------
* Routes, each also under ``/api``: ``/ws``, ``POST/GET /prompt``, ``GET/POST /queue``,
  ``POST /interrupt``, ``GET/POST /history``, ``GET /history/{id}``, ``/view``,
  ``/system_stats``, ``/features``, ``/object_info[/{class}]``, ``/embeddings``,
  ``/extensions``. Status codes, content types and JSON bodies byte for byte where the
  recordings pin them: 200 ``{prompt_id, number, node_errors}``; the 400 validation bodies
  (``no_prompt``, ``invalid_prompt``, ``prompt_no_outputs``,
  ``prompt_outputs_failed_validation`` with per-node errors, re-implemented from ComfyUI's
  validation rules over a small schema of the emulated node classes); 500 text/plain for
  a body that is not JSON; empty 200s without a Content-Type; ``{}`` from
  ``/history/{id}`` while a prompt is queued, running or unknown; 404 empty from ``/view``.
* The queue: a priority heap (lower ``number`` first, ``front`` gives ``-number``), the
  ``number`` counter consumed by validation failures too, client-supplied ``prompt_id``
  taken as any string without a uniqueness check, ``/queue`` items
  ``[number, prompt_id, prompt, extra_data, outputs_to_execute]`` in heap-array order.
* One worker runs one prompt at a time. The order nodes run in follows ComfyUI's
  execution list (ready nodes, output nodes first, then nodes feeding an output...).
  Outputs are cached by node signature the way the classic cache does: an identical
  re-run is fully cached, SaveImageWebsocket never is (its IS_CHANGED is the time).
* Messages for a prompt, their order and fields: ``execution_start``,
  ``execution_cached``, cumulative ``progress_state`` (ints for progress bars and cached
  nodes, floats otherwise), ``executing``, node frames, ``executed``,
  ``execution_success``/``execution_error``/``execution_interrupted``, then ``status``,
  then ``executing {node: null}``; epoch-ms timestamps; history entries
  ``{prompt, outputs, status, meta}``.
* Routing, as ComfyUI's single "current client": per-prompt events go only to the socket
  registered under the prompt's ``client_id``; ``status`` and TEXT (type 3) frames go to
  every socket; a prompt without ``client_id`` sends its ``execution_*``/``executing``/
  ``executed`` to nobody and broadcasts its progress, previews (always type 1), TEXT and
  ``execution_interrupted``. One global FIFO, each send awaited in turn (a slow socket
  delays everyone, as in ComfyUI).
* WebSocket: ``status`` with ``sid`` first (uuid4 hex when there is no ``clientId``);
  only the first text frame may negotiate ``feature_flags`` (type-4 previews with JSON
  metadata); a reused clientId evicts the old socket without closing it, and the old
  socket's close unregisters the new one (ComfyUI's bug, PROTOCOL.md 3.2); reconnecting
  while one's prompt runs replays ``executing {node}`` without ``prompt_id``.
* Interrupts: ``/interrupt`` always answers 200 empty; with a ``prompt_id`` it acts only
  if that prompt runs; the flag is checked when the next node starts (the node named in
  ``execution_interrupted``) and at every SaveImageWebsocket progress step; it is reset
  when a prompt starts.
* Frames: TEXT ``width: W, height: H\\n batch size: B`` from GetImageSize; previews are
  real PNGs encoded like PIL at ``compress_level=1`` (same lengths as the recordings for
  the same colours); the 2048x2048 noise frame of ``success-ws-large.json`` is a valid PNG
  of exactly the recorded 8,646,698 bytes (8,646,706 with its header; README.md's
  8,294,919 is not what the ``large_binary`` recording shows).
* ``execution_error`` for ImageBatch carries ComfyUI's message, traceback text and
  ``current_inputs`` rendered like torch prints a tensor. ComfyUI iterates Python sets in
  a few places (``executed``, ``current_outputs``, the outputs to execute, the inputs
  being validated); their order depends on the process' hash seed. The simulator
  reproduces those orders with one fixed set of hash values, the ones of the recorded
  process, so that lists such as ``dependent_outputs`` match the recordings.
* Loopback Origin check (PROTOCOL.md 2.2): a request to a loopback Host with a foreign
  ``Origin`` gets 403 with an empty body, on HTTP routes and on the WebSocket upgrade.

Simplified
----------
* Nodes are emulated on metadata (sizes, channels, one float32 colour per image), not on
  tensors: only the node classes of the shipped workflows and of the default text-to-image
  graph exist (``/object_info`` lists them); an unknown class is ``invalid_prompt``. Noise images are valid PNGs made of
  zero pixels plus a padding chunk, sized like the recorded one.
* Saved files are kept in memory; their PNG bytes differ from PIL's at
  ``compress_level=4``. ``/view`` ignores ``preview``/``channel`` re-encoding.
* No uploads, userdata, settings, ``/internal``, jobs API, CORS flag, lazy inputs,
  subgraphs or ExecutionBlocker. Tracebacks other than ImageBatch's are empty lists.
* Time: ``node_delay`` seconds per executed node and ``step_delay`` per SaveImageWebsocket
  image or KSampler step stand for the real work (ImageBlur on 1024 px takes ~1.4 s in the
  recordings), both divided by the instance's ``speed``.
* The default text-to-image graph (CheckpointLoaderSimple, CLIPTextEncode, EmptyLatentImage,
  KSampler, VAEDecode; ``txt2img_workflow()``) runs on opaque values: a checkpoint is its
  file name, KSampler sends one ``progress`` per step and no previews (the server's default
  preview method), VAEDecode makes a uniform picture coloured by checkpoint and seed.

Fleets (several instances, each its own ComfyUI)
------------------------------------------------
Each instance is a profile: its node classes (``without_node_classes``, ``extra_node_classes``:
custom image filters under ``custom_nodes.<name>``), in ``/object_info`` and enforced by
validation (an unknown class is the recorded ``invalid_prompt``); its model files per folder
(``models``; ``GET /models`` and ``/models/{folder}`` as server.py answers them, the
checkpoint loader's combo); ``speed``; ``load_seconds``, what a checkpoint loader costs when
the checkpoint is not the one loaded (``loaded_checkpoint``, ``model_loads``); its device and
versions in ``/system_stats``. ``jobs`` holds a ``JobRecord`` per accepted prompt (queued,
started, finished on ``clock``, outcome, checkpoints, model load); ``on_record(event,
record)`` hears each change; ``snapshot()`` is the counters and records as JSON, served at
``GET /__sim/records`` with ``control``. Standalone, ``--records-file`` appends each change as
a JSON line (it survives a kill of the process).

Fault injection and observation (for the proxy's tests)
-------------------------------------------------------
``go_down``/``come_up`` (a partition: queue and history kept), ``restart`` (queue,
running prompt, history, caches and temp files lost), ``drop_websockets``,
``http_error_status``, ``response_delay``, ``stall_post_prompt``/``release_stalled``,
``paused``, ``hold_node`` (stop the worker inside a node until released: deterministic
interleavings without sleeps); ``execution_counts``, ``completed_counts``,
``started_order``, ``completions``, ``requests``, ``last_request_headers()``,
``ws_clients``, ``history``, ``wait_idle()``, ``wait_ws_clients()``, ``wait_stalled()``,
``jobs``, ``records()``, ``model_loads``, ``snapshot()``; ``sleep`` (every delay goes through it).
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import copy
import hashlib
import heapq
import http.client
import ipaddress
import json
import logging
import math
import posixpath
import random
import struct
import time
import urllib.parse
import uuid
import zlib
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import tornado.web
from tornado.httpserver import HTTPServer
from tornado.netutil import bind_sockets
from tornado.websocket import WebSocketClosedError, WebSocketHandler

log = logging.getLogger("comfyui-simulator")

COMFYUI_VERSION = "0.3.64"
# What the server answers to a client's feature_flags (and GET /features). The recordings
# show max_upload_size as an integer on the wire (a 100-byte frame), not 104857600.0.
SERVER_FEATURES = {"supports_preview_metadata": True, "max_upload_size": 104857600}
MAXIMUM_HISTORY_SIZE = 10000
SENSITIVE_EXTRA_DATA_KEYS = ("auth_token_comfy_org", "api_key_comfy_org")
INTERNAL_ERROR_TEXT = "500 Internal Server Error\n\nServer got itself in trouble"
# Binary WebSocket event types (ComfyUI's protocol.BinaryEventTypes).
PREVIEW_IMAGE, TEXT, PREVIEW_IMAGE_WITH_METADATA = 1, 3, 4
PNG_FORMAT = 2  # the image-format word of a type-1 frame: 1 = JPEG, 2 = PNG
# PreviewImage's random file prefix alphabet, typo included ("p" where "w" should be).
TEMP_PREFIX_ALPHABET = "abcdefghijklmnopqrstupvxyz"


def now_ms() -> int:
    return int(time.time() * 1000)


# --- CPython set iteration order ----------------------------------------------------------
#
# ComfyUI returns list(some_set) in several messages. A set of strings iterates in an order
# fixed by the strings' hashes, which Python randomises per process. These hash values make
# real CPython sets iterate like the sets of the process that was recorded (for example
# {"4","5"} -> ["5","4"], and executed {4,7,2,1,3} -> ["2","3","1","7","4"]). Other
# strings get a stable hash of their own.

_RECORDED_HASHES = {
    "1": 16213654522220377, "2": 8276266874131505, "3": 34911493949275825, "4": 169798778570975,
    "5": 17548307405728871, "6": 5452512718058928, "7": 3846300545980606, "8": 31836973083442191,
    # input names: ImageScale reports width before upscale_method, ImageBatch image1 first
    "image1": 1, "image2": 2, "width": 17, "upscale_method": 21,
}


class _FixedHashStr(str):
    """A string whose hash is fixed, so CPython sets of them iterate in a fixed order."""

    __slots__ = ()

    def __hash__(self) -> int:
        plain = str(self)
        fixed = _RECORDED_HASHES.get(plain)
        if fixed is None:
            fixed = int.from_bytes(hashlib.blake2b(plain.encode(), digest_size=7).digest(), "little")
        return fixed

    __eq__ = str.__eq__


def set_order(items) -> list[str]:
    """list(set) of ``items`` added one by one, as ComfyUI's process iterates it."""
    s: set = set()
    for item in items:
        s.add(_FixedHashStr(item))
    return [str(item) for item in s]


def dict_set_order(keys) -> list[str]:
    """list(set(a_dict)): a set built from a dict (pre-sized), such as the declared inputs."""
    return [str(k) for k in set(dict.fromkeys(_FixedHashStr(k) for k in keys))]


# --- float32 values, tensor reprs and PNG encoding ------------------------------------------

def f32(x: float) -> float:
    """Round to float32, the dtype of ComfyUI's image tensors."""
    return struct.unpack("<f", struct.pack("<f", x))[0]


def tensor_repr(shape: tuple[int, ...], value_at: Callable[[tuple[int, ...]], float]) -> str:
    """``str(tensor)`` like torch prints a float tensor (precision 4, edgeitems 3, summarised
    past 1000 elements, 80 columns)."""
    edge = 3
    summarize = math.prod(shape) > 1000

    def shown(size: int) -> list:
        if summarize and size > 2 * edge:
            return list(range(edge)) + [None] + list(range(size - edge, size))
        return list(range(size))

    # The formatter is chosen from the values that are shown.
    values = []

    def collect(prefix: tuple, dim: int) -> None:
        for i in shown(shape[dim]):
            if i is None:
                continue
            if dim == len(shape) - 1:
                values.append(value_at(prefix + (i,)))
            else:
                collect(prefix + (i,), dim + 1)

    collect((), 0)
    nonzero = [abs(v) for v in values if v != 0 and math.isfinite(v)]
    int_mode = all(v == math.ceil(v) for v in nonzero)
    sci_mode = bool(nonzero) and (max(nonzero) / min(nonzero) > 1000 or max(nonzero) > 1e8
                                  or (not int_mode and min(nonzero) < 1e-4))

    def raw(v: float) -> str:
        if sci_mode:
            return f"{v:.4e}"
        return f"{v:.0f}." if int_mode else f"{v:.4f}"

    width = max((len(raw(v)) for v in values), default=1)

    def fmt(v: float) -> str:
        return raw(v).rjust(width)

    def render(prefix: tuple, dim: int, indent: int) -> str:
        if dim == len(shape) - 1:
            items = ["..." if i is None else fmt(value_at(prefix + (i,))) for i in shown(shape[dim])]
            per_line = max(1, (80 - indent) // (width + 2))
            lines = [", ".join(items[k:k + per_line]) for k in range(0, len(items), per_line)]
            return "[" + ("," + "\n" + " " * (indent + 1)).join(lines) + "]"
        slices = ["..." if i is None else render(prefix + (i,), dim + 1, indent + 1) for i in shown(shape[dim])]
        depth = len(shape) - dim
        return "[" + ("," + "\n" * (depth - 1) + " " * (indent + 1)).join(slices) + "]"

    return "tensor(" + render((), 0, len("tensor(")) + ")"


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _deflate(rows, level: int) -> bytes:
    """zlib-compress an iterable of byte strings without joining them first."""
    compressor = zlib.compressobj(level)
    return b"".join([compressor.compress(chunk) for chunk in rows] + [compressor.flush()])


def _rows(row: bytes, height: int):
    """``height`` copies of ``row``, in chunks of about 1 MB."""
    per_chunk = max(1, (1 << 20) // len(row))
    for start in range(0, height, per_chunk):
        yield row * min(per_chunk, height - start)


def _png(width: int, height: int, channels: int, raw_rows, level: int,
         text: dict[str, str] | None = None, pad_to: int = 0) -> bytes:
    colour_type = {1: 0, 3: 2, 4: 6}[channels]
    head = b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, colour_type, 0, 0, 0))
    for key, value in (text or {}).items():
        head += _png_chunk(b"tEXt", key.encode("latin-1") + b"\0" + value.encode("latin-1", "replace"))
    body = _png_chunk(b"IDAT", _deflate(raw_rows, level))
    tail = _png_chunk(b"IEND", b"")
    padding = pad_to - len(head) - len(body) - len(tail) - 12
    if padding >= 0:  # an ancillary, private chunk: decoders skip it
        body += _png_chunk(b"prVt", random.Random(padding).randbytes(padding))
    return head + body + tail


def uniform_png(width: int, height: int, pixel: tuple[float, ...], level: int = 1,
                text: dict[str, str] | None = None) -> bytes:
    """A PNG of one colour, encoded like PIL: every row uses the Sub filter, so a row is the
    first pixel followed by zeros (the recorded SaveImageWebsocket previews have these
    exact lengths)."""
    # ComfyUI: np.clip(255. * image, 0, 255).astype(np.uint8), in float32, truncating.
    first = bytes(int(min(max(f32(255.0 * v), 0.0), 255.0)) for v in pixel)
    row = b"\x01" + first + b"\x00" * (len(pixel) * (width - 1))
    return _png(width, height, len(pixel), _rows(row, height), level, text)


# The recorded SaveImageWebsocket frame of a 2048x2048 noise image held 8,646,698 PNG bytes;
# other noise images get the same bytes-per-raw-byte ratio.
_NOISE_RATIO = 8_646_698 / (2048 * (1 + 2048 * 3))
_noise_pngs: dict[tuple, bytes] = {}


def noise_png(width: int, height: int, channels: int, text: dict[str, str] | None = None) -> bytes:
    """A valid PNG standing for a noise image (zero pixels plus padding), of the size a real
    noise PNG has."""
    size = round(height * (1 + width * channels) * _NOISE_RATIO)
    key = (width, height, channels, json.dumps(text, sort_keys=True))
    if key not in _noise_pngs:
        if len(_noise_pngs) > 4:
            _noise_pngs.clear()
        _noise_pngs[key] = _png(width, height, channels, _rows(b"\x00" * (1 + width * channels), height), 1, text,
                                pad_to=size)
    return _noise_pngs[key]


# --- the emulated node classes ---------------------------------------------------------------

MAX_RESOLUTION = 16384
UPSCALE_METHODS = ["nearest-exact", "bilinear", "area", "bicubic", "lanczos"]
# comfy.samplers.KSampler.SAMPLERS and SCHEDULERS of 0.3.64
SAMPLER_NAMES = [
    "euler", "euler_cfg_pp", "euler_ancestral", "euler_ancestral_cfg_pp", "heun", "heunpp2", "dpm_2",
    "dpm_2_ancestral", "lms", "dpm_fast", "dpm_adaptive", "dpmpp_2s_ancestral", "dpmpp_2s_ancestral_cfg_pp",
    "dpmpp_sde", "dpmpp_sde_gpu", "dpmpp_2m", "dpmpp_2m_cfg_pp", "dpmpp_2m_sde", "dpmpp_2m_sde_gpu",
    "dpmpp_2m_sde_heun", "dpmpp_2m_sde_heun_gpu", "dpmpp_3m_sde", "dpmpp_3m_sde_gpu", "ddpm", "lcm", "ipndm",
    "ipndm_v", "deis", "res_multistep", "res_multistep_cfg_pp", "res_multistep_ancestral",
    "res_multistep_ancestral_cfg_pp", "gradient_estimation", "gradient_estimation_cfg_pp", "er_sde", "seeds_2",
    "seeds_3", "sa_solver", "sa_solver_pece", "ddim", "uni_pc", "uni_pc_bh2"]
SCHEDULER_NAMES = ["simple", "sgm_uniform", "karras", "exponential", "ddim_uniform", "beta", "normal",
                   "linear_quadratic", "kl_optimal"]


@dataclass(frozen=True)
class NodeClass:
    """What ComfyUI knows about a node class: its INPUT_TYPES, RETURN_TYPES and flags."""

    required: dict  # input name -> declaration tuple, as in INPUT_TYPES()["required"]
    returns: tuple = ()
    return_names: tuple = ()
    output_node: bool = False
    category: str = "image"
    display_name: str = ""
    module: str = "nodes"
    hidden: dict = field(default_factory=dict)
    description: str = ""
    always_changed: bool = False  # IS_CHANGED returns the time: never cached
    unique_id_in_signature: bool = False  # has a hidden UNIQUE_ID input
    file_input: str | None = None  # the input VALIDATE_INPUTS checks with exists_annotated_filepath
    model_inputs: tuple = ()  # (input name, model folder): a combo of that folder's files, per instance
    output_tooltips: tuple = ()
    runs_as: str = ""  # a custom node class: it does what this emulated class does

    def object_info(self, name: str) -> dict:
        inputs: dict = {"required": {k: list(v) for k, v in self.required.items()}}
        if self.hidden:
            inputs["hidden"] = dict(self.hidden)
        info = {"input": inputs, "input_order": {k: list(v) for k, v in inputs.items()},
                "output": list(self.returns), "output_is_list": [False] * len(self.returns),
                "output_name": list(self.return_names or self.returns), "name": name,
                "display_name": self.display_name or name, "description": self.description,
                "python_module": self.module, "category": self.category, "output_node": self.output_node}
        if self.output_tooltips:
            info["output_tooltips"] = list(self.output_tooltips)
        return info

    def with_models(self, models: dict[str, list[str]]) -> "NodeClass":
        """This class as one instance declares it: each model input lists that folder's files."""
        if not self.model_inputs:
            return self
        required = dict(self.required)
        for input_name, folder in self.model_inputs:
            declaration = required[input_name]
            required[input_name] = (list(models.get(folder, [])),) + tuple(declaration[1:])
        return replace(self, required=required)


def _int(default, lo, hi, **extra):
    return ("INT", {"default": default, "min": lo, "max": hi, **extra})


NODE_CLASSES: dict[str, NodeClass] = {
    "EmptyImage": NodeClass(
        {"width": _int(512, 1, MAX_RESOLUTION, step=1), "height": _int(512, 1, MAX_RESOLUTION, step=1),
         "batch_size": _int(1, 1, 4096), "color": _int(0, 0, 0xFFFFFF, step=1, display="color")},
        ("IMAGE",)),
    "ImageInvert": NodeClass({"image": ("IMAGE",)}, ("IMAGE",), display_name="Invert Image"),
    "ImageBlur": NodeClass(
        {"image": ("IMAGE",), "blur_radius": _int(1, 1, 31, step=1),
         "sigma": ("FLOAT", {"default": 1.0, "min": 0.1, "max": 10.0, "step": 0.1})},
        ("IMAGE",), category="image/postprocessing", display_name="Image Blur",
        module="comfy_extras.nodes_post_processing"),
    "GetImageSize": NodeClass(
        {"image": ("IMAGE",)}, ("INT", "INT", "INT"), ("width", "height", "batch_size"),
        hidden={"unique_id": "UNIQUE_ID"}, display_name="Get Image Size", module="comfy_extras.nodes_images",
        description="Returns width and height of the image, and passes it through unchanged.",
        unique_id_in_signature=True),
    "ImageScale": NodeClass(
        {"image": ("IMAGE",), "upscale_method": (UPSCALE_METHODS,),
         "width": _int(512, 0, MAX_RESOLUTION, step=1), "height": _int(512, 0, MAX_RESOLUTION, step=1),
         "crop": (["disabled", "center"],)},
        ("IMAGE",), category="image/upscaling", display_name="Upscale Image"),
    "SaveImage": NodeClass(
        {"images": ("IMAGE", {"tooltip": "The images to save."}),
         "filename_prefix": ("STRING", {"default": "ComfyUI", "tooltip": "The prefix for the file to save."})},
        output_node=True, hidden={"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"},
        display_name="Save Image", description="Saves the input images to your ComfyUI output directory."),
    "PreviewImage": NodeClass(
        {"images": ("IMAGE",)}, output_node=True, hidden={"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"},
        display_name="Preview Image", description="Saves the input images to your ComfyUI output directory."),
    "SaveImageWebsocket": NodeClass(
        {"images": ("IMAGE",)}, output_node=True, category="api node/image/websocket",
        module="custom_nodes.websocket_image_save", always_changed=True),
    "SolidMask": NodeClass(
        {"value": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01}),
         "width": _int(512, 1, MAX_RESOLUTION, step=1), "height": _int(512, 1, MAX_RESOLUTION, step=1)},
        ("MASK",), category="mask", module="comfy_extras.nodes_mask"),
    "JoinImageWithAlpha": NodeClass(
        {"image": ("IMAGE",), "alpha": ("MASK",)}, ("IMAGE",), category="mask/compositing",
        display_name="Join Image with Alpha", module="comfy_extras.nodes_compositing"),
    "ImageBatch": NodeClass({"image1": ("IMAGE",), "image2": ("IMAGE",)}, ("IMAGE",), display_name="Batch Images"),
    # Loaders (nodes.py): the file is checked by VALIDATE_INPUTS (exists_annotated_filepath),
    # which replaces the list check; "name [output]" picks the folder, and "..", absolute paths
    # and subfolders are obeyed as the OS obeys them (seen on a real 0.3.64).
    "LoadImage": NodeClass(
        {"image": (["example.png"], {"image_upload": True})}, ("IMAGE", "MASK"), file_input="image"),
    "LoadImageMask": NodeClass(
        {"image": (["example.png"], {"image_upload": True}), "channel": (["alpha", "red", "green", "blue"],)},
        ("MASK",), category="mask", display_name="Load Image (as Mask)", file_input="image"),
    "LoadImageOutput": NodeClass(
        {"image": ("COMBO", {"image_upload": True, "image_folder": "output",
                             "remote": {"route": "/internal/files/output", "refresh_button": True,
                                        "control_after_refresh": "first"}})},
        ("IMAGE", "MASK"), display_name="Load Image (from Outputs)", file_input="image",
        description="Load an image from the output folder. When the refresh button is clicked, the node will "
                    "update the image list and automatically select the first image, allowing for easy "
                    "iteration."),
    "ImageAddNoise": NodeClass(
        {"image": ("IMAGE",),
         "seed": _int(0, 0, 0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                      tooltip="The random seed used for creating the noise."),
         "strength": ("FLOAT", {"default": 0.5, "min": 0.0, "max": 1.0, "step": 0.01})},
        ("IMAGE",), category="image", module="comfy_extras.nodes_images"),
    # The default text-to-image graph (nodes.py), on opaque values: the checkpoint's name stands
    # for the model; KSampler's steps are the work (step_delay each); VAEDecode makes a
    # uniform image whose colour follows the checkpoint and the seed.
    "CheckpointLoaderSimple": NodeClass(
        {"ckpt_name": ([], {"tooltip": "The name of the checkpoint (model) to load."})},
        ("MODEL", "CLIP", "VAE"), category="loaders", model_inputs=(("ckpt_name", "checkpoints"),),
        description="Loads a diffusion model checkpoint, diffusion models are used to denoise latents.",
        display_name="Load Checkpoint",
        output_tooltips=("The model used for denoising latents.",
                         "The CLIP model used for encoding text prompts.",
                         "The VAE model used for encoding and decoding images to and from latent space.")),
    "CLIPTextEncode": NodeClass(
        {"text": ("STRING", {"multiline": True, "dynamicPrompts": True, "tooltip": "The text to be encoded."}),
         "clip": ("CLIP", {"tooltip": "The CLIP model used for encoding the text."})},
        ("CONDITIONING",), category="conditioning", display_name="CLIP Text Encode (Prompt)",
        description="Encodes a text prompt using a CLIP model into an embedding that can be used to guide the "
                    "diffusion model towards generating specific images.",
        output_tooltips=("A conditioning containing the embedded text used to guide the diffusion model.",)),
    "EmptyLatentImage": NodeClass(
        {"width": _int(512, 16, MAX_RESOLUTION, step=8, tooltip="The width of the latent images in pixels."),
         "height": _int(512, 16, MAX_RESOLUTION, step=8, tooltip="The height of the latent images in pixels."),
         "batch_size": _int(1, 1, 4096, tooltip="The number of latent images in the batch.")},
        ("LATENT",), category="latent", display_name="Empty Latent Image",
        description="Create a new batch of empty latent images to be denoised via sampling.",
        output_tooltips=("The empty latent image batch.",)),
    "KSampler": NodeClass(
        {"model": ("MODEL", {"tooltip": "The model used for denoising the input latent."}),
         "seed": _int(0, 0, 0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                      tooltip="The random seed used for creating the noise."),
         "steps": _int(20, 1, 10000, tooltip="The number of steps used in the denoising process."),
         "cfg": ("FLOAT", {"default": 8.0, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01,
                           "tooltip": "The Classifier-Free Guidance scale balances creativity and adherence to the "
                                      "prompt. Higher values result in images more closely matching the prompt "
                                      "however too high values will negatively impact quality."}),
         "sampler_name": (SAMPLER_NAMES, {"tooltip": "The algorithm used when sampling, this can affect the quality, "
                                                   "speed, and style of the generated output."}),
         "scheduler": (SCHEDULER_NAMES, {"tooltip": "The scheduler controls how noise is gradually removed to form "
                                                  "the image."}),
         "positive": ("CONDITIONING", {"tooltip": "The conditioning describing the attributes you want to "
                                                  "include in the image."}),
         "negative": ("CONDITIONING", {"tooltip": "The conditioning describing the attributes you want to "
                                                  "exclude from the image."}),
         "latent_image": ("LATENT", {"tooltip": "The latent image to denoise."}),
         "denoise": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01,
                               "tooltip": "The amount of denoising applied, lower values will maintain the structure "
                                          "of the initial image allowing for image to image sampling."})},
        ("LATENT",), category="sampling",
        description="Uses the provided model, positive and negative conditioning to denoise the latent image.",
        output_tooltips=("The denoised latent.",)),
    "VAEDecode": NodeClass(
        {"samples": ("LATENT", {"tooltip": "The latent to be decoded."}),
         "vae": ("VAE", {"tooltip": "The VAE model used for decoding the latent."})},
        ("IMAGE",), category="latent", display_name="VAE Decode",
        description="Decodes latent images back into pixel space images.", output_tooltips=("The decoded image.",)),
}

# ComfyUI 0.3.64's model folders (folder_paths.folder_names_and_paths, in order: GET /models)
# and the file extensions each lists (filter_files_extensions; an empty set lists everything).
PT_EXTENSIONS = (".ckpt", ".pt", ".pt2", ".bin", ".pth", ".safetensors", ".pkl", ".sft")
MODEL_FOLDERS: dict[str, tuple[str, ...]] = {
    "checkpoints": PT_EXTENSIONS, "configs": (".yaml",), "loras": PT_EXTENSIONS, "vae": PT_EXTENSIONS,
    "text_encoders": PT_EXTENSIONS, "diffusion_models": PT_EXTENSIONS, "clip_vision": PT_EXTENSIONS,
    "style_models": PT_EXTENSIONS, "embeddings": PT_EXTENSIONS, "diffusers": ("folder",),
    "vae_approx": PT_EXTENSIONS, "controlnet": PT_EXTENSIONS, "gligen": PT_EXTENSIONS,
    "upscale_models": PT_EXTENSIONS, "custom_nodes": (), "hypernetworks": PT_EXTENSIONS,
    "photomaker": PT_EXTENSIONS, "classifiers": ("",), "model_patches": PT_EXTENSIONS,
    "audio_encoders": PT_EXTENSIONS,
}


def custom_image_node(name: str) -> NodeClass:
    """A custom node class (custom_nodes/<name>) that filters an image: it does what ImageBlur
    does to the simulator's uniform images (nothing), under its own name."""
    return NodeClass({"image": ("IMAGE",), "strength": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 10.0,
                                                                  "step": 0.01})},
                     ("IMAGE",), category="image/filters", module=f"custom_nodes.{name}", runs_as="ImageBlur")


def txt2img_workflow(ckpt_name: str, *, steps: int = 20, seed: int = 0, width: int = 512, height: int = 512,
                     text: str = "a lighthouse at dusk", filters: tuple[str, ...] = (),
                     output: str = "SaveImage") -> dict:
    """ComfyUI's default text-to-image graph (API format) on ``ckpt_name``: loader "4",
    prompts "6"/"7", latent "5", KSampler "3", VAEDecode "8", then each of ``filters``
    (image-filter node classes, e.g. custom ones) from "10" on, and the output node "9"
    (SaveImage, PreviewImage or SaveImageWebsocket)."""
    prompt = {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt_name}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": text, "clip": ["4", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["4", 1]}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": width, "height": height, "batch_size": 1}},
        "3": {"class_type": "KSampler", "inputs": {
            "model": ["4", 0], "seed": seed, "steps": steps, "cfg": 7.0, "sampler_name": "euler",
            "scheduler": "normal", "positive": ["6", 0], "negative": ["7", 0], "latent_image": ["5", 0],
            "denoise": 1.0}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
    }
    image = ["8", 0]
    for index, class_type in enumerate(filters):
        node_id = str(10 + index)
        prompt[node_id] = {"class_type": class_type, "inputs": {"image": image, "strength": 1.0}}
        image = [node_id, 0]
    prompt["9"] = {"class_type": output, "inputs": {"images": image, **(
        {"filename_prefix": "ComfyUI"} if output == "SaveImage" else {})}}
    return prompt


def is_link(value: Any) -> bool:
    """ComfyUI's graph_utils.is_link: ``[node_id: str, slot: int|float]``."""
    return (isinstance(value, list) and len(value) == 2 and isinstance(value[0], str)
            and isinstance(value[1], (int, float)) and not isinstance(value[1], bool))


SIM_ROOT = "/comfyui"  # where the simulated ComfyUI's input/, output/ and temp/ folders are


def resolve_annotated(name: str) -> tuple[str, str, str] | None:
    """folder_paths.get_annotated_filepath, on the simulated folders: the (type, subfolder,
    filename) a loader reads, or None outside them. The annotation is cut by length, the
    default folder is input/, and the path is then taken as the OS takes it."""
    base = "input"
    for annotation, cut in (("[output]", 9), ("[input]", 8), ("[temp]", 7)):
        if name.endswith(annotation):
            name, base = name[:-cut], annotation[1:-1]
            break
    path = posixpath.normpath(posixpath.join(f"{SIM_ROOT}/{base}", name))
    for kind in ("input", "output", "temp"):
        if path.startswith(f"{SIM_ROOT}/{kind}/"):
            subfolder, _, filename = path[len(SIM_ROOT) + len(kind) + 2:].rpartition("/")
            return kind, subfolder, filename
    return None


# --- validation (POST /prompt) ----------------------------------------------------------------

class PromptError(Exception):
    """A validation failure: HTTP 400 with this body."""

    def __init__(self, kind: str, message: str, details: str = "", node_errors: dict | None = None):
        super().__init__(message)
        self.body = {"error": {"type": kind, "message": message, "details": details, "extra_info": {}},
                     "node_errors": node_errors or {}}


def _types_match(received: str, expected: str) -> bool:
    if received == expected or "*" in (received, expected):
        return True
    if not isinstance(received, str) or not isinstance(expected, str):
        return False  # ComfyUI's validate_node_input: "Not equal, and not strings" (a combo input)
    return bool(set(received.split(",")) & set(expected.split(",")))


def _validate_inputs(prompt: dict, node_id: str, validated: dict, exists: Callable[[str], bool],
                     classes: dict[str, NodeClass]) -> tuple:
    """One node and, recursively, what it links to: (valid, errors, node_id), memoised."""
    if node_id in validated:
        return validated[node_id]
    inputs = prompt[node_id]["inputs"]
    node_class = classes[prompt[node_id]["class_type"]]
    errors: list[dict] = []
    valid = True
    for name in dict_set_order(node_class.required):
        declaration = node_class.required[name]
        input_type = declaration[0]
        config = declaration[1] if len(declaration) > 1 else {}
        input_config = [input_type, config]
        if name not in inputs:
            errors.append({"type": "required_input_missing", "message": "Required input is missing",
                           "details": name, "extra_info": {"input_name": name}})
            continue
        value = inputs[name]
        if isinstance(value, list):
            if len(value) != 2:
                errors.append({"type": "bad_linked_input",
                               "message": "Bad linked input, must be a length-2 list of [node_id, slot_index]",
                               "details": name, "extra_info": {"input_name": name, "input_config": input_config,
                                                               "received_value": value}})
                continue
            # A dangling link raises here (KeyError/IndexError), as in ComfyUI: the caller
            # reports it as an exception during (inner) validation.
            source = prompt[value[0]]
            received_type = classes[source["class_type"]].returns[value[1]]
            if not _types_match(received_type, input_type):
                errors.append({"type": "return_type_mismatch", "message": "Return type mismatch between linked nodes",
                               "details": f"{name}, received_type({received_type}) mismatch input_type({input_type})",
                               "extra_info": {"input_name": name, "input_config": input_config,
                                              "received_type": received_type, "linked_node": value}})
                continue
            try:
                if _validate_inputs(prompt, value[0], validated, exists, classes)[0] is False:
                    valid = False
            except Exception as ex:  # noqa: BLE001 - reported in the response, like ComfyUI
                valid = False
                validated[value[0]] = (False, [{
                    "type": "exception_during_inner_validation", "message": "Exception when validating inner node",
                    "details": str(ex), "extra_info": {
                        "input_name": name, "input_config": input_config, "exception_message": str(ex),
                        "exception_type": type(ex).__name__, "traceback": [], "linked_node": value}}], value[0])
            continue
        if isinstance(value, dict) and "__value__" in value:  # a list widget's value, wrapped
            value = inputs[name] = value["__value__"]
        converters = {"INT": int, "FLOAT": float, "STRING": str, "BOOLEAN": bool}
        if isinstance(input_type, str) and input_type in converters:
            try:
                value = converters[input_type](value)
                inputs[name] = value
            except (TypeError, ValueError) as ex:
                errors.append({"type": "invalid_input_type",
                               "message": f"Failed to convert an input value to a {input_type} value",
                               "details": f"{name}, {value}, {ex}",
                               "extra_info": {"input_name": name, "input_config": input_config,
                                              "received_value": value, "exception_message": str(ex)}})
                continue
        if "min" in config and value < config["min"]:
            errors.append({"type": "value_smaller_than_min",
                           "message": f"Value {value} smaller than min of {config['min']}", "details": name,
                           "extra_info": {"input_name": name, "input_config": input_config, "received_value": value}})
            continue
        if "max" in config and value > config["max"]:
            errors.append({"type": "value_bigger_than_max",
                           "message": f"Value {value} bigger than max of {config['max']}", "details": name,
                           "extra_info": {"input_name": name, "input_config": input_config, "received_value": value}})
            continue
        if name == node_class.file_input:
            if not exists(value):
                errors.append({"type": "custom_validation_failed", "message": "Custom validation failed for node",
                               "details": f"{name} - Invalid image file: {value}", "extra_info": {"input_name": name}})
            continue
        if isinstance(input_type, list) and value not in input_type:
            short = len(input_type) <= 20
            listed = input_type if short else f"(list of length {len(input_type)})"
            errors.append({"type": "value_not_in_list", "message": "Value not in list",
                           "details": f"{name}: '{value}' not in {listed}",
                           "extra_info": {"input_name": name, "input_config": input_config if short else None,
                                          "received_value": value}})
            continue
    result = (not errors and valid, errors, node_id)
    validated[node_id] = result
    return result


def validate_prompt(prompt: Any, partial_targets: Any, exists: Callable[[str], bool] = lambda name: False,
                    classes: dict[str, NodeClass] = NODE_CLASSES) -> tuple[list[str], dict]:
    """ComfyUI's validate_prompt: (outputs to execute, node_errors of skipped outputs), or
    raises PromptError (400). Other exceptions mean a malformed body (500). ``classes``: the
    node classes this server has (NODE_CLASS_MAPPINGS)."""
    if not isinstance(prompt, dict):
        raise TypeError("prompt must be an object")
    outputs = []
    for node_id, node in prompt.items():
        if not isinstance(node, dict):
            raise TypeError(f"node {node_id} is not an object")
        if "class_type" not in node:
            raise PromptError("invalid_prompt", "Cannot execute because a node is missing the class_type property.",
                              f"Node ID '#{node_id}'")
        # ComfyUI looks it up with NODE_CLASS_MAPPINGS.get(class_type): an unhashable class_type
        # (a list, an object) raises TypeError there, so the answer is a 500, not a 400 (seen on
        # a real 0.3.64 with {"class_type": ["SaveImage"]}).
        node_class = classes.get(node["class_type"]) if isinstance(node["class_type"], str) else None
        if isinstance(node["class_type"], (list, dict)):
            raise TypeError(f"unhashable type: '{type(node['class_type']).__name__}'")
        if node_class is None:
            raise PromptError("invalid_prompt", f"Cannot execute because node {node['class_type']} does not exist.",
                              f"Node ID '#{node_id}'")
        if node_class.output_node and (partial_targets is None or node_id in partial_targets):
            outputs.append(node_id)
    if not outputs:
        raise PromptError("prompt_no_outputs", "Prompt has no outputs")
    good: list[str] = []
    failures: list[list[dict]] = []
    node_errors: dict = {}
    validated: dict = {}
    for output in set_order(outputs):
        try:
            valid, reasons, _ = _validate_inputs(prompt, output, validated, exists, classes)
        except Exception as ex:  # noqa: BLE001 - reported in the response, like ComfyUI
            valid, reasons = False, [{"type": "exception_during_validation",
                                      "message": "Exception when validating node", "details": str(ex),
                                      "extra_info": {"exception_type": type(ex).__name__, "traceback": []}}]
            validated[output] = (False, reasons, output)
        if valid:
            good.append(output)
            continue
        failures.append(reasons)
        # Every node with errors of its own names the outputs that depend on it.
        for node_id, (node_valid, node_reasons, _) in validated.items():
            if node_valid is not True and node_reasons:
                if node_id not in node_errors:
                    node_errors[node_id] = {"errors": node_reasons, "dependent_outputs": [],
                                            "class_type": prompt[node_id]["class_type"]}
                node_errors[node_id]["dependent_outputs"].append(output)
    if not good:
        details = "\n".join(f"{r['message']}: {r['details']}" for reasons in failures for r in reasons)
        raise PromptError("prompt_outputs_failed_validation", "Prompt outputs failed validation", details, node_errors)
    return set_order(good), node_errors


# --- the order nodes run in -------------------------------------------------------------------

class ExecutionList:
    """Which node runs next, as ComfyUI's ExecutionList decides it.

    Nodes are gathered depth-first from each output (a node's uncached inputs are pushed
    in input order, and the last one pushed is visited first). Among the nodes whose
    inputs are all available it picks an output node, else a node feeding an output,
    else a node two steps from an output, else the first one gathered.
    """

    def __init__(self, prompt: dict, is_cached: Callable[[str], bool], classes: dict[str, NodeClass] = NODE_CLASSES):
        self.prompt = prompt
        self.is_cached = is_cached
        self.classes = classes
        self.pending: dict[str, None] = {}  # insertion-ordered set
        self.block_count: dict[str, int] = {}
        self.blocking: dict[str, dict[str, None]] = {}

    def _is_output(self, node_id: str) -> bool:
        return self.classes[self.prompt[node_id]["class_type"]].output_node

    def add_node(self, node_id: str) -> None:
        stack, links = [node_id], []
        while stack:
            current = stack.pop()
            if current in self.pending:
                continue
            self.pending[current] = None
            self.block_count[current] = 0
            self.blocking[current] = {}
            for value in self.prompt[current]["inputs"].values():
                if is_link(value):
                    if not self.is_cached(value[0]):
                        stack.append(value[0])
                    links.append((value[0], current))
        for source, target in links:
            if not self.is_cached(source) and target not in self.blocking[source]:
                self.blocking[source][target] = None
                self.block_count[target] += 1

    def next(self) -> str | None:
        ready = [n for n in self.pending if self.block_count[n] == 0]
        for candidate in ready:
            if self._is_output(candidate):
                return candidate
        for candidate in ready:
            if any(self._is_output(b) for b in self.blocking[candidate]):
                return candidate
        for candidate in ready:
            if any(self._is_output(b2) for b in self.blocking[candidate] for b2 in self.blocking[b]):
                return candidate
        return ready[0] if ready else None

    def complete(self, node_id: str) -> None:
        del self.pending[node_id]
        del self.block_count[node_id]
        for target in self.blocking.pop(node_id):
            self.block_count[target] -= 1


# --- node values --------------------------------------------------------------------------------

@dataclass
class Image:
    """An IMAGE tensor [batch, height, width, channels] described by one colour per batch
    element (float32 channel values), or None for noise."""

    height: int
    width: int
    channels: int
    pixels: list  # one tuple of channel values (or None) per batch element

    @property
    def batch(self) -> int:
        return len(self.pixels)

    def repr(self) -> str:
        rng = random.Random(0)
        return tensor_repr((self.batch, self.height, self.width, self.channels),
                           lambda i: self.pixels[i[0]][i[3]] if self.pixels[i[0]] else f32(rng.random()))


@dataclass
class Mask:
    """A MASK tensor [batch, height, width] of one value per batch element."""

    height: int
    width: int
    values: list

    def repr(self) -> str:
        return tensor_repr((len(self.values), self.height, self.width), lambda i: self.values[i[0]])


@dataclass(frozen=True)
class _Opaque:
    """A model object (MODEL, CLIP, VAE) standing for the checkpoint it came from."""

    ckpt_name: str
    kind = "object"

    def repr(self) -> str:
        return f"<{self.kind} object at 0x7f{zlib.crc32(self.ckpt_name.encode()):08x}>"


class Model(_Opaque):
    kind = "comfy.model_patcher.ModelPatcher"


class Clip(_Opaque):
    kind = "comfy.sd.CLIP"


class Vae(_Opaque):
    kind = "comfy.sd.VAE"


@dataclass(frozen=True)
class Conditioning:
    ckpt_name: str
    text: str

    def repr(self) -> str:
        return "[[tensor(...), {'pooled_output': tensor(...)}]]"


@dataclass(frozen=True)
class Latent:
    """A LATENT {"samples": [batch, 4, height/8, width/8]}: its picture size, and once sampled
    the checkpoint and seed that made it."""

    height: int
    width: int
    batch: int
    ckpt_name: str | None = None
    seed: int | None = None

    def repr(self) -> str:
        return "{'samples': tensor(...)}"


class NodeFailed(Exception):
    """An exception raised by a node: execution_error."""

    def __init__(self, exception_type: str, message: str, traceback: list[str] | None = None):
        super().__init__(message)
        self.exception_type = exception_type
        self.message = message
        self.traceback = traceback or []


class Interrupted(Exception):
    """ComfyUI's InterruptProcessingException, raised where the node checks the flag."""


# The traceback ComfyUI 0.3.64 reports for ImageBatch's torch.cat failure (exec_fail).
_CAT_TRACEBACK = [
    '  File "/opt/ComfyUI/execution.py", line 496, in execute\n    output_data, output_ui, has_subgraph, '
    'has_pending_tasks = await get_output_data(prompt_id, unique_id, obj, input_data_all, execution_block_cb='
    'execution_block_cb, pre_execute_cb=pre_execute_cb, hidden_inputs=hidden_inputs)\n' + " " * 62 + "^" * 163 + "\n",
    '  File "/opt/ComfyUI/execution.py", line 315, in get_output_data\n    return_values = await '
    '_async_map_node_over_list(prompt_id, unique_id, obj, input_data_all, obj.FUNCTION, allow_interrupt=True, '
    'execution_block_cb=execution_block_cb, pre_execute_cb=pre_execute_cb, hidden_inputs=hidden_inputs)\n'
    + " " * 20 + "^" * 209 + "\n",
    '  File "/opt/ComfyUI/execution.py", line 289, in _async_map_node_over_list\n'
    '    await process_inputs(input_dict, i)\n',
    '  File "/opt/ComfyUI/execution.py", line 277, in process_inputs\n    result = f(**inputs)\n'
    + " " * 13 + "^" * 11 + "\n",
    '  File "/opt/ComfyUI/nodes.py", line 1857, in batch\n    s = torch.cat((image1, image2), dim=0)\n'
    + " " * 8 + "^" * 34 + "\n",
]


@dataclass
class CacheEntry:
    """A node's outputs (per slot) and UI output, cached by node signature."""

    outputs: list
    ui: dict | None = None


# --- the simulator --------------------------------------------------------------------------------

@dataclass
class QueueItem:
    number: float
    prompt_id: str
    prompt: dict
    extra_data: dict
    outputs: list[str]
    record: "JobRecord | None" = None

    def as_list(self) -> list:
        return [self.number, self.prompt_id, self.prompt, self.extra_data, self.outputs]

    @property
    def client_id(self) -> str | None:
        return self.extra_data.get("client_id")


class NodeHold:
    """Returned by ComfySimulator.hold_node(): the worker stops inside a node (after its
    ``executing`` message, while the node "works") until release()."""

    def __init__(self, node_id: str, prompt_id: str | None):
        self.node_id = node_id
        self.prompt_id = prompt_id
        loop = asyncio.get_running_loop()
        self.reached: asyncio.Future = loop.create_future()  # result: the prompt_id
        self._released: asyncio.Future = loop.create_future()

    def release(self) -> None:
        if not self._released.done():
            self._released.set_result(None)


@dataclass
class JobRecord:
    """What happened to one accepted prompt on one simulator, on the simulator's clock."""

    prompt_id: str
    number: float
    client_id: str | None
    queued_at: float
    started_at: float | None = None
    finished_at: float | None = None
    # "success" | "error" | "interrupted" once it ran; "deleted" (POST /queue), "lost" (a
    # restart took it, queued or running); None while queued or running
    outcome: str | None = None
    checkpoints: list = field(default_factory=list)  # the ckpt_name of each checkpoint loader in the prompt
    model_load: bool = False  # it loaded a checkpoint (load_seconds); False if the loaded one was reused
    generation: int = 0  # the process (restart count) it was accepted by

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def _node_class_table(without: Any, extra: Any) -> dict[str, NodeClass]:
    classes = {name: c for name, c in NODE_CLASSES.items() if name not in set(without or ())}
    unknown = set(without or ()) - set(NODE_CLASSES)
    if unknown:
        raise ValueError(f"without_node_classes: not standard classes: {sorted(unknown)}")
    if isinstance(extra, dict):
        classes.update(extra)
    else:
        classes.update({name: custom_image_node(name) for name in extra or ()})
    return classes


class ComfySimulator:
    """A ComfyUI 0.3.64 look-alike on the current IOLoop. See the module docstring.

    One instance is one ComfyUI server (its own port). Its profile, for fleets of them:
    ``without_node_classes`` (standard classes it lacks), ``extra_node_classes`` (names of
    custom image-filter nodes, or {name: NodeClass}), ``models`` ({folder: [file names]};
    a plain list means checkpoints), ``speed`` (node and step delays are divided by it),
    ``load_seconds`` (the time a checkpoint loader takes when the checkpoint differs from the
    one loaded), ``device_name``/``vram_total``/``vram_free``/``comfyui_version``/
    ``python_version``/``pytorch_version`` (``/system_stats``), ``clock`` (the times of
    ``jobs`` records)."""

    def __init__(self, *, node_delay: float = 0.0, step_delay: float = 0.0, control: bool = False,
                 without_node_classes: Any = (), extra_node_classes: Any = (),
                 models: dict[str, list[str]] | list[str] | None = None, speed: float = 1.0,
                 load_seconds: float = 0.0, device_name: str = "cpu", vram_total: int | None = None,
                 vram_free: int | None = None, comfyui_version: str = COMFYUI_VERSION,
                 python_version: str = "3.11.7 (simulator)", pytorch_version: str = "2.13.0+cpu",
                 clock: Callable[[], float] = time.monotonic):
        if speed <= 0:
            raise ValueError("speed must be > 0")
        self.node_delay = node_delay  # seconds each executed node "works" (at speed 1)
        self.step_delay = step_delay  # seconds per SaveImageWebsocket image or KSampler step (at speed 1)
        self.speed = speed
        self.load_seconds = load_seconds  # not divided by speed: a load is disk and bus bound
        self.control = control  # serve /__sim/... (benchmarks' and separate processes' remote control)
        self.node_classes = _node_class_table(without_node_classes, extra_node_classes)
        self.models: dict[str, list[str]] = {}
        self.set_models({"checkpoints": list(models)} if isinstance(models, (list, tuple)) else (models or {}))
        self.device_name = device_name
        self.vram_total, self.vram_free = vram_total, vram_free
        self.comfyui_version, self.python_version, self.pytorch_version = (comfyui_version, python_version,
                                                                           pytorch_version)
        self.clock = clock
        self.sleep: Callable[[float], Any] = asyncio.sleep  # every node, step and load delay (tests replace it)
        self.address = "127.0.0.1"
        self.port: int | None = None
        # fault injection
        self.http_error_status: int | None = None
        self.response_delay = 0.0
        self.stall_post_prompt: str | None = None  # None | "before_enqueue" | "after_enqueue"
        self.websocket_status: int | None = None  # refuse /ws upgrades with this status (HTTP works)
        # observation (kept over restarts: they count what really happened)
        self.execution_counts: collections.Counter = collections.Counter()  # prompt_id -> starts
        self.completed_counts: collections.Counter = collections.Counter()  # prompt_id -> finishes
        self.started_order: list[str] = []
        self.completions: list[tuple[str, int]] = []  # (prompt_id, process generation)
        self.jobs: list[JobRecord] = []  # one per accepted prompt, in acceptance order
        self.on_record: Callable[[str, JobRecord], None] | None = None  # (event, record) on each change
        self.model_loads = 0  # checkpoint loads (a loader that ran with another checkpoint than the loaded one)
        self.requests: list[tuple[str, str]] = []
        self._last_headers: dict = {}
        # machinery
        self._app = self._make_app()
        self._server: HTTPServer | None = None
        self._stopped = False
        self._worker_task: asyncio.Task | None = None
        self._publisher_task: asyncio.Task | None = None
        self._unpaused = asyncio.Event()
        self._unpaused.set()
        self._changed = asyncio.Event()  # pulsed on every observable change (see _notify)
        self._stalls: set[asyncio.Future] = set()
        self._holds: list[NodeHold] = []
        self._live: set[SimSocket] = set()  # every open WebSocket, registered or evicted
        # files outlive a restart, except temp/ (ComfyUI wipes it at start)
        self._files: dict[tuple[str, str, str], bytes] = {}  # (type, subfolder, filename) -> PNG
        self._pixels: dict[tuple[str, str, str], tuple] = {}  # ... -> (height, width, channels, pixel)
        self.add_file("input", "", "example.png", 8, 8, (f32(0.5), f32(0.25), f32(0.75)))
        self.generation = 0
        self._reset_process()

    def _reset_process(self) -> None:
        """The state of one ComfyUI process: a restart loses all of it."""
        self.generation += 1
        for record in getattr(self, "_open_records", {}).values():
            record.outcome = "lost"  # queued or running when the process ended
            self._tell("lost", record)
        self._open_records: dict[int, JobRecord] = {}  # id(record) -> record, queued or running
        self.loaded_checkpoint: str | None = None  # the checkpoint in "VRAM"
        self._sockets: dict[str, SimSocket] = {}  # the routing table: clientId -> socket
        self._sockets_metadata: dict[str, dict] = {}  # clientId -> {"feature_flags": {...}}
        self._queue: list = []  # heap of (number, prompt_id, seq, QueueItem)
        self._seq = 0
        self._running: QueueItem | None = None
        self._history: dict[str, dict] = {}
        self._number = 0
        self._client_id: str | None = None  # server.client_id: the running prompt's
        self._last_node_id: str | None = None
        self._interrupt_flag = False
        self._cache: dict[str, CacheEntry] = {}  # node signature -> outputs
        self._preview_prefixes: dict[str, str] = {}  # PreviewImage node -> random prefix
        self._events: asyncio.Queue = asyncio.Queue()  # the global FIFO
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._files = {k: v for k, v in self._files.items() if k[0] != "temp"}
        self._pixels = {k: v for k, v in self._pixels.items() if k[0] != "temp"}

    def add_file(self, kind: str, subfolder: str, filename: str, height: int, width: int, pixel: tuple) -> None:
        """Put an image in one of the folders (an upload, a file the operator placed)."""
        self._files[(kind, subfolder, filename)] = uniform_png(width, height, pixel, 1)
        self._pixels[(kind, subfolder, filename)] = (height, width, len(pixel), pixel)

    def set_models(self, models: dict[str, list[str]]) -> None:
        """Replace the model files ({folder: [file names]}): seen at once by /models,
        /object_info and validation, as ComfyUI rescans its folders. A folder that is not one
        of ComfyUI's is added (as a custom node's add_model_folder_path does)."""
        self.models = {folder: sorted(set(files)) for folder, files in models.items()}
        self._refresh_model_inputs()

    def add_model(self, folder: str, filename: str) -> None:
        self.models[folder] = sorted(set(self.models.get(folder, [])) | {filename})
        self._refresh_model_inputs()

    def remove_model(self, folder: str, filename: str) -> None:
        self.models[folder] = [f for f in self.models.get(folder, []) if f != filename]
        self._refresh_model_inputs()

    def model_folders(self) -> list[str]:
        """GET /models: folder_paths.folder_names_and_paths' keys."""
        return list(MODEL_FOLDERS) + [f for f in self.models if f not in MODEL_FOLDERS]

    def model_files(self, folder: str) -> list[str] | None:
        """GET /models/{folder}: folder_paths.get_filename_list (sorted, filtered by the
        folder's extensions), or None for an unknown folder (404)."""
        if folder not in MODEL_FOLDERS and folder not in self.models:
            return None
        extensions = MODEL_FOLDERS.get(folder, ())
        return sorted(f for f in self.models.get(folder, [])
                      if not extensions or posixpath.splitext(f)[1].lower() in extensions)

    def _refresh_model_inputs(self) -> None:
        available = {folder: self.model_files(folder) or [] for folder in self.models}
        for name, node_class in list(self.node_classes.items()):
            standard = NODE_CLASSES.get(name, node_class)
            if standard.model_inputs:
                self.node_classes[name] = standard.with_models(available)

    def records(self, prompt_id: str) -> list[JobRecord]:
        """Every record of this prompt id (one per time it was accepted)."""
        return [r for r in self.jobs if r.prompt_id == prompt_id]

    def snapshot(self) -> dict:
        """The observation counters and records as JSON (GET /__sim/records with control)."""
        return {"execution_counts": dict(self.execution_counts), "completed_counts": dict(self.completed_counts),
                "model_loads": self.model_loads, "loaded_checkpoint": self.loaded_checkpoint,
                "generation": self.generation, "jobs": [r.as_dict() for r in self.jobs]}

    def file_exists(self, name: str) -> bool:
        where = resolve_annotated(name) if isinstance(name, str) else None
        return where is not None and where in self._files

    # --- public properties ----------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://{self.address}:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://{self.address}:{self.port}/ws"

    @property
    def paused(self) -> bool:
        return not self._unpaused.is_set()

    @paused.setter
    def paused(self, value: bool) -> None:
        if value:
            self._unpaused.clear()
        else:
            self._unpaused.set()

    @property
    def ws_clients(self) -> dict[str, int]:
        """clientId -> number of open sockets (registered or evicted)."""
        return dict(collections.Counter(sock.sid for sock in self._live))

    @property
    def history(self) -> dict[str, dict]:
        return self._history

    def last_request_headers(self) -> dict:
        return dict(self._last_headers)

    def queue_remaining(self) -> int:
        return len(self._queue) + (self._running is not None)

    # --- lifecycle ------------------------------------------------------------------------
    async def start(self, port: int = 0, address: str = "127.0.0.1") -> None:
        self.address = address
        self._stopped = False
        self._listen(port)
        self._start_tasks()

    def _start_tasks(self) -> None:
        self._worker_task = asyncio.ensure_future(self._worker())
        self._publisher_task = asyncio.ensure_future(self._publisher())

    async def _cancel_tasks(self) -> None:
        for task in (self._worker_task, self._publisher_task):
            if task is not None and not task.done():
                task.cancel()
                try:
                    await task
                except asyncio.CancelledError:
                    pass
        self._worker_task = self._publisher_task = None

    def _listen(self, port: int) -> None:
        sockets = bind_sockets(port, self.address)
        self.port = sockets[0].getsockname()[1]
        self._server = HTTPServer(self._app)
        self._server.add_sockets(sockets)

    def _make_app(self) -> tornado.web.Application:
        kw = {"sim": self}
        routes: list = []
        for prefix in ("", "/api"):
            routes += [
                (prefix + r"/ws", SimSocket, kw),
                (prefix + r"/prompt", PromptHandler, kw),
                (prefix + r"/queue", QueueHandler, kw),
                (prefix + r"/interrupt", InterruptHandler, kw),
                (prefix + r"/history", HistoryHandler, kw),
                (prefix + r"/history/([^/]+)", HistoryItemHandler, kw),
                (prefix + r"/view", ViewHandler, kw),
                (prefix + r"/upload/image", UploadImageHandler, kw),
            ] + ([(prefix + r"/__sim/(pause|resume)", SimControlHandler, kw),
                  (prefix + r"/__sim/records", SimRecordsHandler, kw)] if self.control else []) + [
                (prefix + r"/models", ModelsHandler, kw),
                (prefix + r"/models/([^/]+)", ModelsHandler, kw),
                (prefix + r"/system_stats", SystemStatsHandler, kw),
                (prefix + r"/features", FeaturesHandler, kw),
                (prefix + r"/object_info", ObjectInfoHandler, kw),
                (prefix + r"/object_info/([^/]+)", ObjectInfoHandler, kw),
                (prefix + r"/embeddings", ListHandler, kw),
                (prefix + r"/extensions", ListHandler, kw),
            ]
        return tornado.web.Application(routes, default_handler_class=NotFoundHandler, default_handler_args=kw,
                                       websocket_max_message_size=4 * 1024 * 1024)  # aiohttp's max_msg_size

    async def go_down(self) -> None:
        """A network partition: refuse new connections and drop every open one (WebSockets
        without a close frame). The process goes on: queue, running prompt and history are
        kept."""
        if self._server is None:
            return
        server, self._server = self._server, None
        server.stop()
        self.drop_websockets()
        self._end_stalls()
        await server.close_all_connections()

    async def crash(self) -> None:
        """A SIGKILL: connections refused from now on, and the process is gone (its queue,
        running prompt, history and caches); come_up() starts it again, empty."""
        await self.go_down()
        await self._cancel_tasks()
        self._reset_process()
        self._crashed = True

    async def come_up(self) -> None:
        """Listen again on the same port (after crash(): as a new process)."""
        if getattr(self, "_crashed", False):
            self._crashed = False
            self._start_tasks()
        if self._server is None and not self._stopped:
            self._listen(self.port)

    async def restart(self) -> None:
        """A ComfyUI restart: down, then up on the same port as a new process that has lost
        its queue, running prompt, history, caches and temp files."""
        await self.go_down()
        await self._cancel_tasks()
        self._reset_process()
        self._start_tasks()
        await self.come_up()

    async def stop(self) -> None:
        """Stop listening, close every socket, cancel the worker. Idempotent."""
        await self.go_down()
        self._stopped = True
        await self._cancel_tasks()
        for hold in self._holds:
            hold.release()

    def drop_websockets(self) -> None:
        """Abruptly close every WebSocket (no close frame); the server stays up."""
        for sock in list(self._live):
            sock.abort()

    def release_stalled(self) -> None:
        """Let stalled POST /prompt requests go on; they answer normally (a request whose
        client has gone away is dropped)."""
        for stall in list(self._stalls):
            if not stall.done():
                stall.set_result(True)

    def _end_stalls(self) -> None:
        for stall in list(self._stalls):
            if not stall.done():
                stall.set_result(False)

    def hold_node(self, node_id: str, prompt_id: str | None = None) -> NodeHold:
        """Stop the worker the next time it executes ``node_id`` (of ``prompt_id`` if given),
        after its ``executing`` message, until ``release()``; ``reached`` resolves then. Call
        it from the simulator's loop. Cached nodes do no work and are never held. Tests use
        it to place an interrupt or a reconnect inside a given node without sleeping."""
        hold = NodeHold(node_id, prompt_id)
        self._holds.append(hold)
        return hold

    # --- waiting for things, without polling ------------------------------------------------
    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def _wait_until(self, predicate: Callable[[], bool], timeout: float) -> None:
        async def wait() -> None:
            while not predicate():
                await self._changed.wait()
        await asyncio.wait_for(wait(), timeout)

    async def wait_idle(self, timeout: float = 10) -> None:
        """Resolve when nothing is queued or running."""
        await asyncio.wait_for(self._idle.wait(), timeout)

    async def wait_ws_clients(self, predicate: Callable[[dict], bool], timeout: float = 10) -> None:
        """Resolve when ``predicate(self.ws_clients)`` holds (sockets open and close)."""
        await self._wait_until(lambda: predicate(self.ws_clients), timeout)

    async def wait_stalled(self, count: int = 1, timeout: float = 10) -> None:
        """Resolve when exactly ``count`` POST /prompt requests are stalled."""
        await self._wait_until(lambda: len(self._stalls) == count, timeout)

    async def _stall(self, handler: "SimHandler") -> bool:
        """Hang a request until release_stalled() (True) or until its client goes away or
        the server goes down (False)."""
        stall = asyncio.get_running_loop().create_future()
        handler.stall = stall
        self._stalls.add(stall)
        self._notify()
        try:
            return await stall
        finally:
            self._stalls.discard(stall)
            self._notify()

    # --- the event bus: one FIFO, published socket by socket -----------------------------
    def _send(self, event: str, data: dict, sid: str | None) -> None:
        """send_sync: to the socket registered under ``sid``, or to every socket if None."""
        self._events.put_nowait((json.dumps({"type": event, "data": data}), False, sid))

    def _send_bytes(self, payload: bytes, sid: str | None) -> None:
        self._events.put_nowait((payload, True, sid))

    def _send_direct(self, sid: str, event: str, data: dict) -> None:
        """What ComfyUI's WebSocket handler sends itself (not through the FIFO)."""
        sock = self._sockets.get(sid)
        if sock is not None:
            try:
                sent = sock.write_message(json.dumps({"type": event, "data": data}))
            except WebSocketClosedError:
                return
            sent.add_done_callback(lambda f: f.cancelled() or f.exception())  # a closed socket is fine

    def _broadcast_status(self) -> None:
        self._send("status", {"status": {"exec_info": {"queue_remaining": self.queue_remaining()}}}, None)

    async def _publisher(self) -> None:
        while True:
            payload, binary, sid = await self._events.get()
            # Recipients are looked up when the event is published, as in ComfyUI.
            if sid is None:
                targets = list(self._sockets.values())
            else:
                targets = [self._sockets[sid]] if sid in self._sockets else []
            for sock in targets:
                try:
                    await sock.write_message(payload, binary=binary)
                except Exception:  # noqa: BLE001 - a socket gone mid-send is skipped
                    pass

    # --- the queue ----------------------------------------------------------------------------
    def _put(self, item: QueueItem) -> None:
        checkpoints = [node["inputs"].get("ckpt_name") for node in item.prompt.values()
                       if node["class_type"] == "CheckpointLoaderSimple"]
        item.record = JobRecord(item.prompt_id, item.number, item.client_id, self.clock(), checkpoints=checkpoints,
                                generation=self.generation)
        self.jobs.append(item.record)
        self._open_records[id(item.record)] = item.record
        self._seq += 1
        heapq.heappush(self._queue, (item.number, item.prompt_id, self._seq, item))
        self._idle.clear()
        self._broadcast_status()
        self._wake.set()

    def _delete_pending(self, prompt_id: str) -> bool:
        for index, entry in enumerate(self._queue):
            if entry[3].prompt_id == prompt_id:
                self._close_record(entry[3], "deleted")
                self._queue.pop(index)
                heapq.heapify(self._queue)
                self._broadcast_status()
                self._update_idle()
                return True
        return False

    def _wipe_queue(self) -> None:
        for entry in self._queue:
            self._close_record(entry[3], "deleted")
        self._queue = []
        self._broadcast_status()
        self._update_idle()

    def _close_record(self, item: QueueItem, outcome: str) -> None:
        if item.record is not None:
            item.record.outcome = outcome
            if outcome not in ("deleted", "lost"):
                item.record.finished_at = self.clock()
            self._open_records.pop(id(item.record), None)
            self._tell(outcome, item.record)

    def _tell(self, event: str, record: JobRecord) -> None:
        if self.on_record is not None:
            self.on_record(event, record)

    def _update_idle(self) -> None:
        if not self._queue and self._running is None:
            self._idle.set()

    async def _worker(self) -> None:
        while True:
            await self._unpaused.wait()
            if not self._queue:
                self._update_idle()
                self._wake.clear()
                await self._wake.wait()
                continue
            *_, item = heapq.heappop(self._queue)
            self._running = item
            self._broadcast_status()
            try:
                await self._execute(item)
            except Exception:  # noqa: BLE001 - a simulator bug must not stop the worker
                log.exception("the simulator failed on prompt %s", item.prompt_id)
                self._running = self._last_node_id = None
                self._broadcast_status()
                self._update_idle()

    # --- executing a prompt -------------------------------------------------------------------
    def _signatures(self, prompt: dict) -> dict[str, str]:
        """The classic cache key of every node: class, IS_CHANGED, inputs and ancestors."""
        memo: dict[str, str] = {}

        def signature(node_id: str) -> str:
            if node_id not in memo:
                node = prompt[node_id]
                node_class = self.node_classes[node["class_type"]]
                parts: list = [node["class_type"], uuid.uuid4().hex if node_class.always_changed else None]
                if node_class.unique_id_in_signature:
                    parts.append(node_id)
                for key in sorted(node["inputs"]):
                    value = node["inputs"][key]
                    if is_link(value) and value[0] in prompt:
                        parts.append((key, "LINK", signature(value[0]), value[1]))
                    else:
                        parts.append((key, json.dumps(value, sort_keys=True)))
                memo[node_id] = hashlib.sha256(repr(parts).encode()).hexdigest()
            return memo[node_id]

        return {node_id: signature(node_id) for node_id in prompt}

    async def _execute(self, item: QueueItem) -> None:
        prompt_id, prompt, cid = item.prompt_id, item.prompt, item.client_id
        self.execution_counts[prompt_id] += 1
        self.started_order.append(prompt_id)
        if item.record is not None:
            item.record.started_at = self.clock()
            self._tell("started", item.record)
        self._client_id = cid
        self._interrupt_flag = False  # nodes.interrupt_processing(False)
        messages: list = []

        def add_message(event: str, data: dict, broadcast: bool) -> None:
            data = {**data, "timestamp": now_ms()}
            messages.append([event, data])
            if cid is not None or broadcast:
                self._send(event, data, cid)

        add_message("execution_start", {"prompt_id": prompt_id}, False)
        signatures = self._signatures(prompt)
        kept = set(signatures.values())  # the classic cache forgets what this prompt lacks
        self._cache = {k: v for k, v in self._cache.items() if k in kept}
        cached_nodes = [n for n in prompt if signatures[n] in self._cache]
        add_message("execution_cached", {"nodes": cached_nodes, "prompt_id": prompt_id}, False)

        run = ExecutionList(prompt, lambda n: signatures[n] in self._cache, self.node_classes)
        for output in item.outputs:
            run.add_node(output)
        progress = _Progress(self, prompt_id, cid)
        executed: list[str] = []  # insertion order of ComfyUI's `executed` set
        current_outputs = set_order(prompt)  # caches.outputs.all_node_ids()
        success = False
        outcome = "error"
        try:
            while (node_id := run.next()) is not None:
                await self._execute_node(item, node_id, signatures, progress, executed)
                run.complete(node_id)
            add_message("execution_success", {"prompt_id": prompt_id}, False)
            success = True
            outcome = "success"
        except Interrupted as e:
            outcome = "interrupted"
            node_id = e.args[0]
            add_message("execution_interrupted", {
                "prompt_id": prompt_id, "node_id": node_id, "node_type": prompt[node_id]["class_type"],
                "executed": set_order(executed)}, True)
        except _NodeError as e:
            node_id, failure = e.node_id, e.failure
            add_message("execution_error", {
                "prompt_id": prompt_id, "node_id": node_id, "node_type": prompt[node_id]["class_type"],
                "executed": set_order(executed), "exception_message": failure.message,
                "exception_type": failure.exception_type, "traceback": failure.traceback,
                "current_inputs": e.current_inputs, "current_outputs": current_outputs}, False)
        self._last_node_id = None

        # history_result: the UI outputs cached for this prompt's nodes (restored ones too)
        outputs, meta = {}, {}
        for node_id in current_outputs:
            entry = self._cache.get(signatures[node_id])
            if entry is not None and entry.ui is not None:
                outputs[node_id] = entry.ui
                meta[node_id] = {"node_id": node_id, "display_node": node_id, "parent_node": None,
                                 "real_node_id": node_id}
        # task_done: history, then status, then the "executing null" done marker
        extra_data = {k: v for k, v in item.extra_data.items() if k not in SENSITIVE_EXTRA_DATA_KEYS}
        self._history[prompt_id] = {
            "prompt": [item.number, prompt_id, prompt, extra_data, item.outputs],
            "outputs": outputs,
            "status": {"status_str": "success" if success else "error", "completed": success, "messages": messages},
            "meta": meta,
        }
        if len(self._history) > MAXIMUM_HISTORY_SIZE:
            self._history.pop(next(iter(self._history)))
        self._running = None
        self._broadcast_status()
        if cid is not None:
            self._send("executing", {"node": None, "prompt_id": prompt_id}, cid)
        self.completed_counts[prompt_id] += 1
        self.completions.append((prompt_id, self.generation))
        self._close_record(item, outcome)
        self._update_idle()
        self._notify()

    async def _execute_node(self, item: QueueItem, node_id: str, signatures: dict, progress: "_Progress",
                            executed: list) -> None:
        prompt_id, cid = item.prompt_id, item.client_id
        class_type = item.prompt[node_id]["class_type"]
        entry = self._cache.get(signatures[node_id])
        if entry is not None:  # cached: its UI output again, no `executing`
            if cid is not None:
                self._send("executed", {"node": node_id, "display_node": node_id, "output": entry.ui,
                                        "prompt_id": prompt_id}, cid)
            progress.finish(node_id)
            return
        progress.start(node_id)
        if cid is not None:
            self._last_node_id = node_id
            self._send("executing", {"node": node_id, "display_node": node_id, "prompt_id": prompt_id}, cid)
        self._check_interrupt(node_id)  # before_node_execution()
        await self._node_work(item, node_id)
        inputs: dict = {}
        try:
            try:
                inputs = self._resolve_inputs(item.prompt, node_id, signatures)
                outputs, ui = await self._run_node(item, node_id, class_type, inputs, progress)
            except (NodeFailed, Interrupted):
                raise
            except Exception as ex:  # noqa: BLE001 - e.g. a literal where a link was expected
                raise NodeFailed(type(ex).__name__, str(ex)) from None
        except NodeFailed as failure:
            current_inputs = {name: [value.repr() if hasattr(value, "repr") else value]
                              for name, value in inputs.items()}
            raise _NodeError(node_id, failure, current_inputs) from None
        if ui:
            if cid is not None:
                self._send("executed", {"node": node_id, "display_node": node_id, "output": ui,
                                        "prompt_id": prompt_id}, cid)
        self._cache[signatures[node_id]] = CacheEntry(outputs, ui or None)
        progress.finish(node_id)
        executed.append(node_id)

    def _check_interrupt(self, node_id: str) -> None:
        if self._interrupt_flag:
            self._interrupt_flag = False
            raise Interrupted(node_id)

    async def _node_work(self, item: QueueItem, node_id: str) -> None:
        """The time a node takes: node_delay, or a hold_node() until it is released. Always
        yields to the loop, so HTTP requests and interrupts get in between nodes."""
        hold = next((h for h in self._holds if h.node_id == node_id
                     and h.prompt_id in (None, item.prompt_id)), None)
        if hold is not None:
            self._holds.remove(hold)
            if not hold.reached.done():
                hold.reached.set_result(item.prompt_id)
            await hold._released
        await self.sleep(self.node_delay / self.speed)

    def _resolve_inputs(self, prompt: dict, node_id: str, signatures: dict) -> dict:
        """Input values in the order ComfyUI's get_input_data builds them."""
        node_class = self.node_classes[prompt[node_id]["class_type"]]
        inputs = prompt[node_id]["inputs"]
        resolved = {}
        for name in dict_set_order(node_class.required):
            if name not in inputs:
                continue
            value = inputs[name]
            if is_link(value):
                value = self._cache[signatures[value[0]]].outputs[int(value[1])]
            resolved[name] = value
        return resolved

    async def _run_node(self, item: QueueItem, node_id: str, class_type: str, inputs: dict,
                        progress: "_Progress") -> tuple[list, dict | None]:
        """What each emulated node class does: (outputs per slot, UI output)."""

        def image(name: str) -> Image:
            value = inputs.get(name)
            if not isinstance(value, Image):
                raise NodeFailed("AttributeError", f"'{type(value).__name__}' object has no attribute 'shape'")
            return value

        class_type = self.node_classes[class_type].runs_as or class_type
        if class_type == "CheckpointLoaderSimple":
            name = inputs["ckpt_name"]
            await self._load_checkpoint(item, name)
            return [Model(name), Clip(name), Vae(name)], None
        if class_type == "CLIPTextEncode":
            clip = inputs.get("clip")
            if not isinstance(clip, Clip):
                raise NodeFailed("RuntimeError", "ERROR: clip input is invalid: None\n\nIf the clip is from a "
                                 "checkpoint loader node your checkpoint does not contain a valid clip or text "
                                 "encoder model.")
            return [Conditioning(clip.ckpt_name, str(inputs["text"]))], None
        if class_type == "EmptyLatentImage":
            return [Latent(inputs["height"], inputs["width"], inputs["batch_size"])], None
        if class_type == "KSampler":
            return [await self._sample(item, node_id, inputs, progress)], None
        if class_type == "VAEDecode":
            samples = inputs.get("samples")
            if not isinstance(samples, Latent):
                raise NodeFailed("TypeError", f"'{type(samples).__name__}' object is not subscriptable")
            # one uniform colour per picture, following the checkpoint and the seed
            digest = hashlib.sha256(repr((samples.ckpt_name, samples.seed)).encode()).digest()
            pixels = [tuple(f32(digest[3 * i + c] / 255.0) for c in range(3)) for i in range(samples.batch)]
            return [Image(samples.height, samples.width, 3, pixels)], None
        if class_type == "EmptyImage":
            color = inputs["color"]
            pixel = tuple(f32(((color >> shift) & 0xFF) / 0xFF) for shift in (16, 8, 0))
            return [Image(inputs["height"], inputs["width"], 3, [pixel] * inputs["batch_size"])], None
        if class_type == "ImageInvert":
            src = image("image")
            return [Image(src.height, src.width, src.channels,
                          [tuple(f32(1.0 - v) for v in p) if p else None for p in src.pixels])], None
        if class_type == "ImageBlur":  # a blurred uniform image is the same image
            return [image("image")], None
        if class_type == "ImageAddNoise":
            src = image("image")
            return [src if inputs["strength"] == 0 else Image(src.height, src.width, src.channels,
                                                              [None] * src.batch)], None
        if class_type == "GetImageSize":
            src = image("image")
            # send_progress_text() has no sid: a broadcast to every socket, whoever's prompt
            text = f"width: {src.width}, height: {src.height}\n batch size: {src.batch}".encode()
            node = node_id.encode()
            self._send_bytes(struct.pack(">II", TEXT, len(node)) + node + text, None)
            return [src.width, src.height, src.batch], None
        if class_type == "ImageScale":
            src = image("image")
            width, height = inputs["width"], inputs["height"]
            if width == 0 and height == 0:
                return [src], None
            if width == 0:
                width = max(1, round(src.width * height / src.height))
            elif height == 0:
                height = max(1, round(src.height * width / src.width))
            return [Image(height, width, src.channels, list(src.pixels))], None
        if class_type == "SolidMask":
            return [Mask(inputs["height"], inputs["width"], [f32(inputs["value"])])], None
        if class_type == "JoinImageWithAlpha":
            src, alpha = image("image"), inputs["alpha"]
            count = min(src.batch, len(alpha.values))
            pixels = [src.pixels[i][:3] + (f32(1.0 - alpha.values[i]),) if src.pixels[i] else None
                      for i in range(count)]
            return [Image(src.height, src.width, 4, pixels)], None
        if class_type == "ImageBatch":
            first, second = image("image1"), image("image2")
            # image2 is rescaled to image1's size first; channels must then match for torch.cat
            if first.channels != second.channels:
                raise NodeFailed("RuntimeError", "Sizes of tensors must match except in dimension 0. Expected size "
                                 f"{first.channels} but got size {second.channels} for tensor number 1 in the list.\n",
                                 list(_CAT_TRACEBACK))
            return [Image(first.height, first.width, first.channels, first.pixels + second.pixels)], None
        if class_type in ("SaveImage", "PreviewImage"):
            return [], {"images": self._save_images(item, node_id, class_type, image("images"),
                                                     inputs.get("filename_prefix", "ComfyUI"))}
        if class_type in ("LoadImage", "LoadImageOutput", "LoadImageMask"):
            height, width, channels, pixel = self._pixels[resolve_annotated(inputs["image"])]
            alpha = f32(1.0 - pixel[3]) if pixel is not None and channels == 4 else f32(0.0)
            if class_type == "LoadImageMask":  # converted to RGBA first: every channel exists
                band = "rgba".index(inputs["channel"][0])
                value = alpha if band == 3 else (pixel[band] if pixel is not None else f32(0.5))
                return [Mask(height, width, [value])], None
            rgb = pixel[:3] if pixel is not None else None
            # no alpha channel: ComfyUI's mask is a 64x64 of zeros
            return [Image(height, width, 3, [rgb]), Mask(height, width, [alpha]) if channels == 4
                    else Mask(64, 64, [f32(0.0)])], None
        if class_type == "SaveImageWebsocket":
            await self._save_image_websocket(item, node_id, image("images"), progress)
            return [], None
        raise NodeFailed("NotImplementedError", f"{class_type} is not emulated")

    async def _load_checkpoint(self, item: QueueItem, name: str) -> None:
        """A checkpoint loader that runs: free if this checkpoint is the loaded one, else
        load_seconds (one model load)."""
        if name == self.loaded_checkpoint:
            return
        self.loaded_checkpoint = None
        await self.sleep(self.load_seconds)
        self.loaded_checkpoint = name
        self.model_loads += 1
        if item.record is not None:
            item.record.model_load = True

    async def _sample(self, item: QueueItem, node_id: str, inputs: dict, progress: "_Progress") -> "Latent":
        """KSampler: ``steps`` steps of step_delay / speed each, a progress message after each
        one, interruptible between steps (no previews: the server's default preview method)."""
        model, latent = inputs.get("model"), inputs.get("latent_image")
        for name, value, kind in (("model", model, Model), ("positive", inputs.get("positive"), Conditioning),
                                  ("negative", inputs.get("negative"), Conditioning), ("latent_image", latent, Latent)):
            if not isinstance(value, kind):
                raise NodeFailed("AttributeError", f"'{type(value).__name__}' object has no attribute "
                                 f"{'model' if name == 'model' else 'shape'!r}")
        steps = inputs["steps"]
        for step in range(steps):
            self._check_interrupt(node_id)
            await self.sleep(self.step_delay / self.speed)
            progress.update(node_id, step + 1, steps)
            self._send("progress", {"value": step + 1, "max": steps, "prompt_id": item.prompt_id, "node": node_id},
                       item.client_id)
        return Latent(latent.height, latent.width, latent.batch, model.ckpt_name, inputs["seed"])

    def _png(self, src: Image, index: int, level: int, text: dict | None = None) -> bytes:
        pixel = src.pixels[index]
        if pixel is None:
            return noise_png(src.width, src.height, src.channels, text)
        return uniform_png(src.width, src.height, pixel, level, text)

    def _save_images(self, item: QueueItem, node_id: str, class_type: str, src: Image, prefix: str) -> list[dict]:
        if class_type == "SaveImage":
            kind, level = "output", 4
        else:  # PreviewImage: temp/, a random prefix per node object
            kind, level = "temp", 1
            if node_id not in self._preview_prefixes:
                self._preview_prefixes[node_id] = "ComfyUI_temp_" + "".join(
                    random.choice(TEMP_PREFIX_ALPHABET) for _ in range(5))
            prefix = self._preview_prefixes[node_id]
        subfolder, _, name = str(prefix).replace("\\", "/").rpartition("/")
        # The counter continues after the files already there, for every user alike.
        counters = [f[len(name) + 1:len(name) + 6] for (k, sub, f) in self._files
                    if k == kind and sub == subfolder and f.startswith(name + "_")]
        counter = max((int(c) for c in counters if c.isdigit()), default=0) + 1
        text = {"prompt": json.dumps(item.prompt)}
        for key, value in (item.extra_data.get("extra_pnginfo") or {}).items():
            text[key] = json.dumps(value)
        images = []
        for index in range(src.batch):
            filename = f"{name}_{counter:05}_.png"
            self._files[(kind, subfolder, filename)] = self._png(src, index, level, text)
            self._pixels[(kind, subfolder, filename)] = (src.height, src.width, src.channels, src.pixels[index])
            images.append({"filename": filename, "subfolder": subfolder, "type": kind})
            counter += 1
        return images

    async def _save_image_websocket(self, item: QueueItem, node_id: str, src: Image, progress: "_Progress") -> None:
        """One progress step and one full-size PNG preview per image, interruptible."""
        prompt_id, cid = item.prompt_id, item.client_id
        total = src.batch
        for step in range(total):
            await self.sleep(self.step_delay / self.speed)
            self._check_interrupt(node_id)  # the ProgressBar hook checks the flag
            png = self._png(src, step, 1)
            progress.update(node_id, step, total)
            metadata = cid is not None and self._sockets_metadata.get(cid, {}).get(
                "feature_flags", {}).get("supports_preview_metadata") is True
            if metadata:
                meta = json.dumps({"node_id": node_id, "prompt_id": prompt_id, "display_node_id": node_id,
                                   "parent_node_id": None, "real_node_id": node_id, "image_type": "image/png"})
                self._send_bytes(struct.pack(">II", PREVIEW_IMAGE_WITH_METADATA, len(meta)) + meta.encode() + png, cid)
            self._send("progress", {"value": step, "max": total, "prompt_id": prompt_id, "node": node_id}, cid)
            if not metadata:
                self._send_bytes(struct.pack(">II", PREVIEW_IMAGE, PNG_FORMAT) + png, cid)

    # --- POST /prompt ---------------------------------------------------------------------------
    def _post_prompt(self, body: Any) -> tuple[int, dict]:
        """The body of ComfyUI's post_prompt, Python semantics included: (status, answer).
        A malformed body raises (500)."""
        if "number" in body:
            number = float(body["number"])
        else:
            number = self._number
            if "front" in body and body["front"]:
                number = -number
            self._number += 1
        if "prompt" not in body:
            return 400, PromptError("no_prompt", "No prompt provided", "No prompt provided").body
        prompt = body["prompt"]
        prompt_id = str(body.get("prompt_id", uuid.uuid4()))
        partial = body["partial_execution_targets"] if "partial_execution_targets" in body else None
        error = None
        try:
            outputs, node_errors = validate_prompt(prompt, partial, self.file_exists, self.node_classes)
        except PromptError as e:
            error = e
        extra_data = body["extra_data"] if "extra_data" in body else {}
        if not isinstance(extra_data, dict):
            raise TypeError("extra_data must be an object")  # (simplified: ComfyUI fails later)
        if "client_id" in body:
            extra_data["client_id"] = body["client_id"]
        if error is not None:
            log.warning("invalid prompt: %s", error.body["error"])
            return 400, error.body
        self._put(QueueItem(number, prompt_id, prompt, extra_data, outputs))
        return 200, {"prompt_id": prompt_id, "number": number, "node_errors": node_errors}

    def _interrupt(self, prompt_id: Any) -> None:
        if prompt_id:
            if self._running is not None and self._running.prompt_id == prompt_id:
                self._interrupt_flag = True
            else:
                log.info("Prompt %s is not currently running, skipping interrupt", prompt_id)
        else:
            self._interrupt_flag = True  # a global interrupt, whoever is running


class _NodeError(Exception):
    def __init__(self, node_id: str, failure: NodeFailed, current_inputs: dict):
        super().__init__(failure.message)
        self.node_id = node_id
        self.failure = failure
        self.current_inputs = current_inputs


class _Progress:
    """The progress registry of one prompt: every change sends the cumulative state of the
    nodes started so far (to the client, or to everybody when there is none)."""

    def __init__(self, sim: ComfySimulator, prompt_id: str, cid: str | None):
        self.sim, self.prompt_id, self.cid = sim, prompt_id, cid
        self.nodes: dict[str, dict] = {}

    def _entry(self, node_id: str) -> dict:
        if node_id not in self.nodes:
            self.nodes[node_id] = {"value": 0, "max": 1, "state": "pending", "node_id": node_id,
                                   "prompt_id": self.prompt_id, "display_node_id": node_id, "parent_node_id": None,
                                   "real_node_id": node_id}
        return self.nodes[node_id]

    def _publish(self) -> None:
        nodes = {n: dict(e) for n, e in self.nodes.items() if e["state"] != "pending"}
        self.sim._send("progress_state", {"prompt_id": self.prompt_id, "nodes": nodes}, self.cid)

    def start(self, node_id: str) -> None:
        self._entry(node_id).update(state="running", value=0.0, max=1.0)
        self._publish()

    def update(self, node_id: str, value, maximum) -> None:
        self._entry(node_id).update(state="running", value=value, max=maximum)
        self._publish()

    def finish(self, node_id: str) -> None:
        entry = self._entry(node_id)
        entry.update(state="finished", value=entry["max"])
        self._publish()


# --- HTTP handlers -----------------------------------------------------------------------------

def _is_loopback(hostname: str | None) -> bool:
    if not hostname:
        return False
    if hostname == "localhost":
        return True
    try:
        return ipaddress.ip_address(hostname).is_loopback
    except ValueError:
        return False  # names are not resolved (simplified)


def foreign_origin(headers) -> bool:
    """ComfyUI's origin-only middleware: a loopback Host with an Origin of another host."""
    host, origin = headers.get("Host"), headers.get("Origin")
    if host is None or origin is None:
        return False
    host_domain = host.lower()
    parsed = urllib.parse.urlparse(origin)
    origin_domain = parsed.netloc.lower()
    host_parsed = urllib.parse.urlsplit("//" + host_domain)
    try:
        if parsed.port is None:  # compare without ports when either side has none
            host_domain = host_parsed.hostname
        if host_parsed.port is None:
            origin_domain = parsed.hostname
    except ValueError:
        return False
    return bool(_is_loopback(host_parsed.hostname) and host_domain and origin_domain and host_domain != origin_domain)


class SimHandler(tornado.web.RequestHandler):
    """Common behaviour: request log, fault injection, the Origin rule, aiohttp-like
    responses (JSON, empty bodies without Content-Type, text/plain errors)."""

    def initialize(self, sim: ComfySimulator) -> None:
        self.sim = sim
        self.stall: asyncio.Future | None = None

    def compute_etag(self) -> None:
        return None  # aiohttp sends no ETag (and so never a 304)

    async def prepare(self) -> None:
        sim = self.sim
        sim.requests.append((self.request.method, self.request.path))
        sim._last_headers = dict(self.request.headers)
        if sim.response_delay:
            await asyncio.sleep(sim.response_delay)
        if sim.http_error_status:
            self.text(sim.http_error_status, INTERNAL_ERROR_TEXT if sim.http_error_status == 500 else
                      f"{sim.http_error_status}: {self._reason_for(sim.http_error_status)}")
        elif foreign_origin(self.request.headers):
            log.warning("request with non matching host and origin, returning 403")
            self.empty(403)

    @staticmethod
    def _reason_for(status: int) -> str:
        return http.client.responses.get(status, "Error")

    def options(self, *args) -> None:
        self.empty(200)  # the middleware answers OPTIONS itself

    def on_connection_close(self) -> None:
        if self.stall is not None and not self.stall.done():
            self.stall.set_result(False)

    def client_gone(self) -> bool:
        stream = getattr(self.request.connection, "stream", None)
        return stream is None or stream.closed()

    def json(self, data: Any, status: int = 200) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "application/json; charset=utf-8")
        self.finish(json.dumps(data))

    def empty(self, status: int = 200) -> None:
        self.set_status(status)
        self.clear_header("Content-Type")
        self.finish()

    def text(self, status: int, body: str) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "text/plain; charset=utf-8")
        self.finish(body)

    def internal_error(self) -> None:
        self.text(500, INTERNAL_ERROR_TEXT)

    def body_json(self) -> Any:
        """aiohttp's request.json(): raises ValueError for a body that is not JSON."""
        return json.loads(self.request.body.decode("utf-8"))

    def write_error(self, status_code: int, **kwargs) -> None:
        if status_code == 500:
            self.set_header("Content-Type", "text/plain; charset=utf-8")
            self.finish(INTERNAL_ERROR_TEXT)
        else:
            self.set_header("Content-Type", "text/plain; charset=utf-8")
            self.finish(f"{status_code}: {self._reason}")


class NotFoundHandler(SimHandler):
    def get(self, *args) -> None:
        self.text(404, "404: Not Found")

    post = put = delete = patch = get


class PromptHandler(SimHandler):
    def get(self) -> None:
        self.json({"exec_info": {"queue_remaining": self.sim.queue_remaining()}})

    async def post(self) -> None:
        sim = self.sim
        try:
            body = self.body_json()
        except ValueError:
            return self.internal_error()
        if sim.stall_post_prompt == "before_enqueue" and (not await sim._stall(self) or self.client_gone()):
            return  # never processed: the client went away, or the server went down
        try:
            status, answer = sim._post_prompt(body)
        except Exception:  # noqa: BLE001 - aiohttp turns any exception into a 500
            log.exception("POST /prompt failed")
            return self.internal_error()
        if sim.stall_post_prompt == "after_enqueue" and not await sim._stall(self):
            return  # queued (or rejected), but the answer never comes
        if not self.client_gone():
            self.json(answer, status)


class QueueHandler(SimHandler):
    def get(self) -> None:
        sim = self.sim
        self.json({"queue_running": [sim._running.as_list()] if sim._running else [],
                   "queue_pending": [entry[3].as_list() for entry in sim._queue]})

    def post(self) -> None:
        sim = self.sim
        try:
            body = self.body_json()
            if "clear" in body and body["clear"]:
                sim._wipe_queue()
            if "delete" in body:
                for prompt_id in body["delete"]:
                    sim._delete_pending(prompt_id)
        except Exception:  # noqa: BLE001
            return self.internal_error()
        self.empty(200)


class InterruptHandler(SimHandler):
    def post(self) -> None:
        try:
            body = self.body_json()
        except ValueError:
            body = {}  # an unreadable body is a global interrupt
        if not isinstance(body, dict):
            return self.internal_error()
        self.sim._interrupt(body.get("prompt_id"))
        self.empty(200)


class HistoryHandler(SimHandler):
    def get(self) -> None:
        history = self.sim._history
        try:
            max_items = self.get_query_argument("max_items", None)
            max_items = int(max_items) if max_items is not None else None
            offset = self.get_query_argument("offset", None)
            offset = int(offset) if offset is not None else -1
        except ValueError:
            return self.internal_error()
        if offset < 0 and max_items is not None:
            offset = len(history) - max_items
        out = {}
        for index, key in enumerate(history):
            if index >= offset:
                out[key] = history[key]
                if max_items is not None and len(out) >= max_items:
                    break
        self.json(out)

    def post(self) -> None:
        history = self.sim._history
        try:
            body = self.body_json()
            if "clear" in body and body["clear"]:
                history.clear()
            if "delete" in body:
                for prompt_id in body["delete"]:
                    history.pop(prompt_id, None)
        except Exception:  # noqa: BLE001
            return self.internal_error()
        self.empty(200)


class HistoryItemHandler(SimHandler):
    def get(self, prompt_id: str) -> None:
        entry = self.sim._history.get(prompt_id)
        self.json({prompt_id: copy.deepcopy(entry)} if entry is not None else {})


class ViewHandler(SimHandler):
    def get(self) -> None:
        filename = self.get_query_argument("filename", None)
        if filename is None:
            return self.empty(404)
        kind = self.get_query_argument("type", "output")
        for annotation in ("output", "input", "temp"):  # "name.png [temp]" picks the folder
            if filename.endswith(f" [{annotation}]"):
                filename, kind = filename[:-len(annotation) - 3], annotation
        subfolder = self.get_query_argument("subfolder", "")
        if not filename or filename.startswith("/") or ".." in filename:
            return self.empty(400)
        if ".." in subfolder.replace("\\", "/").split("/") or subfolder.startswith("/"):
            return self.empty(403)
        data = self.sim._files.get((kind, subfolder.strip("/"), filename))
        if data is None:
            return self.empty(404)
        # aiohttp's FileResponse, as a real 0.3.64 answers: an ETag and Last-Modified, 304 for
        # a matching If-None-Match, one byte range as 206 (416 outside the file).
        self.set_header("Content-Disposition", f'filename="{filename}"')
        self.set_header("Content-Type", "image/png")
        etag = '"%s-%x"' % (hashlib.sha256(data).hexdigest()[:16], len(data))
        self.set_header("Etag", etag)
        self.set_header("Last-Modified", "Tue, 01 Dec 2026 11:28:04 GMT")
        self.set_header("Accept-Ranges", "bytes")
        if self.request.headers.get("If-None-Match") == etag:
            self.set_status(304)
            return self.finish()
        asked = self.request.headers.get("Range", "")
        if asked.startswith("bytes=") and "," not in asked:
            first, _, last = asked[6:].partition("-")
            try:
                start = int(first) if first else max(0, len(data) - int(last))
                end = min(int(last), len(data) - 1) if first and last else len(data) - 1
            except ValueError:
                start, end = 0, len(data) - 1
            if start >= len(data):
                self.set_status(416)
                self.set_header("Content-Range", f"bytes */{len(data)}")
                return self.finish()
            self.set_status(206)
            self.set_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
            return self.finish(data[start:end + 1])
        self.finish(data)


class SimControlHandler(SimHandler):
    """Not ComfyUI's: with --control, a benchmark pauses and resumes the worker from outside."""

    def post(self, what: str) -> None:
        self.sim.paused = what == "pause"
        self.empty(200)


class SimRecordsHandler(SimHandler):
    """Not ComfyUI's: with --control, GET /__sim/records answers snapshot() (counters and job
    records), so a test can count executions in a simulator that runs as its own process."""

    def get(self) -> None:
        self.json(self.sim.snapshot())


class ModelsHandler(SimHandler):
    """GET /models (the model folders) and /models/{folder} (its files, or 404 empty)."""

    def get(self, folder: str | None = None) -> None:
        if folder is None:
            return self.json(self.sim.model_folders())
        files = self.sim.model_files(folder)
        if files is None:
            return self.empty(404)
        self.json(files)


class UploadImageHandler(SimHandler):
    """POST /upload/image (multipart: image, subfolder, type, overwrite), as server.py's
    image_upload: a path outside the folder is a 400; without overwrite a taken name becomes
    "name (1).ext". The image is kept as an 8-bit picture of unknown content (noise)."""

    def post(self) -> None:
        files = self.request.files.get("image")
        if not files or not files[0].filename:
            return self.empty(400)
        kind = self.get_body_argument("type", "input")
        kind = kind if kind in ("input", "output", "temp") else "input"
        subfolder = posixpath.normpath(self.get_body_argument("subfolder", "")).strip("/")
        subfolder = "" if subfolder == "." else subfolder
        filename = files[0].filename
        path = posixpath.normpath(posixpath.join(f"{SIM_ROOT}/{kind}", subfolder, filename))
        if not path.startswith(f"{SIM_ROOT}/{kind}/"):
            return self.empty(400)
        if self.get_body_argument("overwrite", "") not in ("true", "1"):
            stem, dot, ext = filename.rpartition(".")
            i = 1
            while (kind, subfolder, filename) in self.sim._files:
                filename = f"{stem} ({i}).{ext}" if dot else f"{filename} ({i})"
                i += 1
        data = files[0].body
        width, height = (struct.unpack(">II", data[16:24]) if data[:8] == b"\x89PNG\r\n\x1a\n" else (64, 64))
        self.sim._files[(kind, subfolder, filename)] = data
        self.sim._pixels[(kind, subfolder, filename)] = (height, width, 3, None)
        self.json({"name": filename, "subfolder": subfolder, "type": kind})


class SystemStatsHandler(SimHandler):
    def get(self) -> None:
        sim = self.sim
        ram, ram_free = 25276510208, 24248344576
        if sim.device_name == "cpu":  # the recorded --cpu server: the device is the RAM
            device = {"name": "cpu", "type": "cpu", "index": None, "vram_total": sim.vram_total or ram,
                      "vram_free": sim.vram_free or ram_free, "torch_vram_total": sim.vram_total or ram,
                      "torch_vram_free": sim.vram_free or ram_free}
            argv = ["main.py", "--cpu", "--listen", sim.address, "--port", str(sim.port)]
        else:  # e.g. "cuda:0 NVIDIA GeForce RTX 4090 : cudaMallocAsync"
            total = sim.vram_total or 25386352640
            free = sim.vram_free if sim.vram_free is not None else total - 524288000
            device = {"name": sim.device_name, "type": sim.device_name.split(":")[0].split()[0],
                      "index": 0, "vram_total": total, "vram_free": free,
                      "torch_vram_total": total - free, "torch_vram_free": 0}
            argv = ["main.py", "--listen", sim.address, "--port", str(sim.port)]
        self.json({"system": {"os": "posix", "ram_total": ram, "ram_free": ram_free,
                              "comfyui_version": sim.comfyui_version, "required_frontend_version": "1.27.10",
                              "installed_templates_version": "0.1.95", "required_templates_version": "0.1.95",
                              "python_version": sim.python_version, "pytorch_version": sim.pytorch_version,
                              "embedded_python": False, "argv": argv},
                   "devices": [device]})


class FeaturesHandler(SimHandler):
    def get(self) -> None:
        self.json(SERVER_FEATURES)


class ObjectInfoHandler(SimHandler):
    def get(self, name: str | None = None) -> None:
        classes = self.sim.node_classes
        if name is None:
            return self.json({n: c.object_info(n) for n, c in classes.items()})
        node_class = classes.get(name)
        self.json({name: node_class.object_info(name)} if node_class else {})


class ListHandler(SimHandler):
    def get(self) -> None:
        self.json([])  # no embeddings, no frontend extensions


class SimSocket(WebSocketHandler):
    """``/ws``: ComfyUI's WebSocket handler, registration bug included."""

    def initialize(self, sim: ComfySimulator) -> None:
        self.sim = sim
        self.sid = ""
        self.generation = sim.generation
        self.first_message = True
        self.cleaned_up = False

    def check_origin(self, origin: str) -> bool:
        return True  # ComfyUI's own Origin rule is applied in get()

    def get_compression_options(self) -> dict:
        return {}  # permessage-deflate when the client offers it, as aiohttp's compress=True

    async def get(self, *args, **kwargs) -> None:
        sim = self.sim
        sim.requests.append(("GET", self.request.path))
        sim._last_headers = dict(self.request.headers)
        if sim.response_delay:
            await asyncio.sleep(sim.response_delay)
        if sim.http_error_status:
            self.set_status(sim.http_error_status)
            self.set_header("Content-Type", "text/plain; charset=utf-8")
            return self.finish(INTERNAL_ERROR_TEXT if sim.http_error_status == 500 else
                               f"{sim.http_error_status}: {SimHandler._reason_for(sim.http_error_status)}")
        if foreign_origin(self.request.headers):
            self.set_status(403)
            self.clear_header("Content-Type")
            return self.finish()
        if sim.websocket_status:  # e.g. a proxy in front of ComfyUI that drops the Upgrade header
            self.set_status(sim.websocket_status)
            return self.finish()
        await super().get(*args, **kwargs)

    def open(self) -> None:
        sim = self.sim
        self.generation = sim.generation
        sid = self.request.query_arguments.get("clientId", [b""])[0].decode("utf-8", "replace")
        if sid:
            sim._sockets.pop(sid, None)  # "Reusing existing session": the old socket stays open
        else:
            sid = uuid.uuid4().hex
        self.sid = sid
        sim._sockets[sid] = self
        sim._sockets_metadata[sid] = {"feature_flags": {}}
        sim._live.add(self)
        sim._notify()
        sim._send_direct(sid, "status", {"status": {"exec_info": {"queue_remaining": sim.queue_remaining()}},
                                         "sid": sid})
        # Reconnecting while one's prompt runs: the current node, without prompt_id.
        if sim._client_id == sid and sim._last_node_id is not None:
            sim._send_direct(sid, "executing", {"node": sim._last_node_id})

    def on_message(self, message) -> None:
        if isinstance(message, bytes):
            return
        try:
            data = json.loads(message)
        except ValueError:
            log.warning("Invalid JSON received from client %s", self.sid)
            return
        try:
            if self.first_message and data.get("type") == "feature_flags":
                # Stored by clientId: with a duplicate clientId this is the newer socket's entry.
                self.sim._sockets_metadata[self.sid]["feature_flags"] = data.get("data", {})
                self.sim._send_direct(self.sid, "feature_flags", SERVER_FEATURES)
            self.first_message = False
        except Exception as e:  # noqa: BLE001 - logged and ignored, like ComfyUI
            log.error("Error processing WebSocket message: %s", e)

    def on_close(self) -> None:
        self._unregister()

    def _unregister(self) -> None:
        sim = self.sim
        if self.cleaned_up:
            return
        self.cleaned_up = True
        sim._live.discard(self)
        if self.generation == sim.generation:  # a socket of the process before a restart has no say
            # ComfyUI's `finally:` pops the clientId even if a newer socket holds it (the bug).
            sim._sockets.pop(self.sid, None)
            sim._sockets_metadata.pop(self.sid, None)
        sim._notify()

    def abort(self) -> None:
        """Drop the TCP connection without a close frame (a network failure). The server
        forgets the socket at once."""
        self._unregister()
        stream = getattr(self.ws_connection, "stream", None)
        if stream is not None and not stream.closed():
            stream.close()
        elif self.ws_connection is not None:
            self.close()


def _names(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="A ComfyUI 0.3.64 SIMULATOR (a test double, not ComfyUI)")
    parser.add_argument("--port", type=int, default=8188)
    parser.add_argument("--address", default="127.0.0.1")
    parser.add_argument("--node-delay", type=float, default=0.0, help="seconds each executed node takes")
    parser.add_argument("--step-delay", type=float, default=0.0, help="seconds per SaveImageWebsocket image")
    parser.add_argument("--control", action="store_true",
                        help="serve POST /__sim/pause and /__sim/resume and GET /__sim/records "
                             "(not ComfyUI's: for benchmarks and tests)")
    parser.add_argument("--speed", type=float, default=1.0, help="node and step delays are divided by this")
    parser.add_argument("--load-seconds", type=float, default=0.0,
                        help="seconds a checkpoint loader takes when the checkpoint is not the loaded one")
    parser.add_argument("--models", type=_names, default=[], metavar="A,B,...", help="checkpoint file names")
    parser.add_argument("--model-files", action="append", default=[], metavar="FOLDER=A,B,...",
                        help="files of another model folder (repeatable), e.g. loras=detail.safetensors")
    parser.add_argument("--without-node-classes", type=_names, default=[], metavar="A,B,...",
                        help="standard node classes this server lacks (e.g. SaveImageWebsocket)")
    parser.add_argument("--extra-node-classes", type=_names, default=[], metavar="A,B,...",
                        help="custom image-filter node classes this server has (inputs image, strength)")
    parser.add_argument("--device-name", default="cpu", help='/system_stats device, e.g. "cuda:0 NVIDIA L4"')
    parser.add_argument("--vram-total", type=int, default=None, help="/system_stats vram_total (bytes)")
    parser.add_argument("--vram-free", type=int, default=None, help="/system_stats vram_free (bytes)")
    parser.add_argument("--records-file", default=None, metavar="PATH",
                        help="append one JSON line per job event (started, success, error, interrupted, deleted, "
                             "lost) to PATH, flushed at once: the record survives a kill of this process")
    args = parser.parse_args(argv)
    models = {"checkpoints": args.models}
    for spec in args.model_files:
        folder, sep, names = spec.partition("=")
        if not sep or not folder:
            parser.error(f"--model-files: expected FOLDER=A,B,..., got {spec!r}")
        models[folder] = models.get(folder, []) + _names(names)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    async def run() -> None:
        try:
            sim = ComfySimulator(node_delay=args.node_delay, step_delay=args.step_delay, control=args.control,
                                 speed=args.speed, load_seconds=args.load_seconds, models=models,
                                 without_node_classes=args.without_node_classes,
                                 extra_node_classes=args.extra_node_classes, device_name=args.device_name,
                                 vram_total=args.vram_total, vram_free=args.vram_free)
        except ValueError as e:
            parser.error(str(e))
        records = open(args.records_file, "a", encoding="utf-8") if args.records_file else None
        if records is not None:
            def write(event: str, record: JobRecord) -> None:  # one short line: written at once, not buffered
                records.write(json.dumps({"event": event, "port": sim.port, **record.as_dict()}) + "\n")
                records.flush()
            sim.on_record = write
        await sim.start(args.port, args.address)
        log.warning("ComfyUI %s SIMULATOR (a test double, not ComfyUI) listening on %s", COMFYUI_VERSION, sim.url)
        try:
            await asyncio.Event().wait()  # forever
        finally:
            await sim.stop()
            if records is not None:
                records.close()

    try:
        asyncio.run(run())
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
