"""Users' files and ComfyUI's cache, kept apart per user (ISOLATE_USERS).

ComfyUI has one output folder, one input folder and one execution cache for everyone. Left
alone, any user can load another's output by name (``LoadImage`` with ``name [output]``,
names are guessable counters), escape the folders with ``..`` or an absolute path, write into
another's subfolder through ``filename_prefix``, and get another's file (with their PNG
metadata) from the cache by sending an identical prompt (checked on a real ComfyUI 0.3.64).

So every prompt is rewritten before it is recorded:

- every ``filename_prefix`` is put under the owner's folder (``u_<hmac of the user>/``), so
  outputs are saved there, their names are neither shared nor guessable, and ComfyUI's file
  counters no longer tell one user how much another saved;
- every file input (the known loaders' inputs, ``FILE_INPUTS``, and any string ending in
  ComfyUI's ``[output]``/``[input]``/``[temp]`` annotation) may only name the owner's own
  files: a plain relative name, resolved inside the owner's folder;
- every node gets one extra input, ``CACHE_SCOPE_INPUT``, holding the owner's folder name.
  ComfyUI puts every input in a node's cache signature but passes only declared ones to the
  node, so the cache still works within a user's own prompts and never across users (except
  for ``SHARED_CACHE_NODES``, which an operator may list, e.g. model loaders).
"""
from __future__ import annotations

import hashlib
import hmac
from typing import Any, Iterable

from ..model import ErrorCode, RequestError

CACHE_SCOPE_INPUT = "_proxy_cache_scope"
ANNOTATIONS = {"[output]": "output", "[input]": "input", "[temp]": "temp"}

# The inputs of ComfyUI's own nodes (0.3.64) that name a file to read; custom nodes that
# read files by another input are added by the operator (FILE_INPUTS: "Class.input").
BUILTIN_FILE_INPUTS = frozenset({
    ("LoadImage", "image"), ("LoadImageMask", "image"), ("LoadImageOutput", "image"),
    ("LoadLatent", "latent"), ("LoadAudio", "audio"), ("LoadVideo", "file"),
    ("Load3D", "model_file"), ("Load3D", "image"), ("Load3DAnimation", "model_file"),
    ("Load3DAnimation", "image"), ("WebcamCapture", "image"),
    ("LoadImageSetFromFolderNode", "folder"), ("LoadImageTextSetFromFolderNode", "folder"),
    ("GeminiInputFiles", "file"), ("OpenAIInputFiles", "file"),
})


def _refuse(node_id: str, class_type: str, input_name: str, value: Any, why: str) -> RequestError:
    shown = value[:200] if isinstance(value, str) else value
    return RequestError(ErrorCode.INVALID_PROMPT,
                        f"Node {node_id[:64]!r} ({class_type[:64]}): input {input_name[:64]!r} {why}",
                        details={"node_id": node_id[:64], "class_type": class_type[:64],
                                 "input_name": input_name[:64], "value": shown})


def _split_annotation(value: str) -> tuple[str, str | None]:
    """``name [output]`` -> (``name``, ``"output"``), the way ComfyUI's folder_paths reads it."""
    for suffix, folder in ANNOTATIONS.items():
        if value.endswith(suffix):
            return value[:-len(suffix)].rstrip(" "), folder
    return value, None


def _relative_parts(name: str) -> list[str] | None:
    """The components of a plain relative path, or None for anything that could leave a
    folder: absolute, a drive, a backslash (a separator on Windows), ``.``/``..``, NUL."""
    if not name or "\\" in name or "\x00" in name or name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        return None
    parts = name.split("/")
    if any(p in ("", ".", "..") for p in parts):
        return None
    return parts


def _climbs(value: str) -> bool:
    """A ``..`` path component anywhere: no prompt text needs one, a custom loader may obey it."""
    return ".." in value and ".." in value.replace("\\", "/").split("/")


class UserIsolation:
    """Rewrites a user's prompt so it can only touch that user's files and cache entries."""

    def __init__(self, secret: bytes, *, file_inputs: Iterable[str] = (), shared_cache_nodes: Iterable[str] = (),
                 shared_input_folder: str = ""):
        self.secret = secret
        extra = set()
        for item in file_inputs:
            class_type, _, input_name = item.partition(".")
            extra.add((class_type, input_name))
        self.file_inputs = BUILTIN_FILE_INPUTS | extra
        self.shared_cache_nodes = frozenset(shared_cache_nodes)
        self.shared_input_folder = shared_input_folder.strip("/")
        self._folders: dict[str, str] = {}

    def folder(self, owner: str) -> str:
        """The owner's subfolder in ComfyUI's output and input folders: stable across restarts
        (the secret is kept in the store), unguessable without the secret."""
        folder = self._folders.get(owner)
        if folder is None:
            digest = hmac.new(self.secret, owner.encode("utf-8", "surrogatepass"), hashlib.sha256).hexdigest()
            folder = self._folders[owner] = "u_" + digest[:24]
        return folder

    def owns(self, owner: str, subfolder: str) -> bool:
        """Is this output/input subfolder the owner's own (or below it)?"""
        own = self.folder(owner)
        return subfolder == own or subfolder.startswith(own + "/")

    def confine(self, owner: str, prompt: dict) -> dict:
        """A copy of ``prompt`` confined to the owner's files and cache; raises RequestError
        naming the node and input for a file reference that could reach anyone else's."""
        own = self.folder(owner)
        confined = {}
        for node_id, node in prompt.items():
            class_type = node.get("class_type")
            inputs = node.get("inputs")
            if not isinstance(class_type, str) or not isinstance(inputs, dict):
                confined[node_id] = node  # ComfyUI's own validation answers these
                continue
            new_inputs = {}
            for name, value in inputs.items():
                if name == CACHE_SCOPE_INPUT:
                    continue  # ours to set
                if name == "filename_prefix":
                    value = self._prefix(own, node_id, class_type, name, value)
                elif (class_type, name) in self.file_inputs:
                    value = self._file(own, node_id, class_type, name, value, known=True)
                elif isinstance(value, str) and (_split_annotation(value)[1] is not None or _climbs(value)):
                    value = self._file(own, node_id, class_type, name, value, known=False)
                new_inputs[name] = value
            if class_type not in self.shared_cache_nodes:
                new_inputs[CACHE_SCOPE_INPUT] = own
            confined[node_id] = {**node, "inputs": new_inputs}
        return confined

    def _prefix(self, own: str, node_id: str, class_type: str, name: str, value: Any) -> Any:
        if not isinstance(value, str):
            raise _refuse(node_id, class_type, name, value,
                          "must be a plain string here: outputs are saved in each user's own folder")
        parts = _relative_parts(value)
        if parts is None:
            raise _refuse(node_id, class_type, name, value,
                          "must be a relative name without '..', '\\' or a leading '/'")
        return "/".join(parts if parts[0] == own else [own, *parts])

    def _file(self, own: str, node_id: str, class_type: str, name: str, value: Any, known: bool) -> Any:
        if isinstance(value, dict) and known:  # Load3D: {"image": path, "mask": path, ...}
            return {k: self._file(own, node_id, class_type, f"{name}.{k}", v, True) for k, v in value.items()}
        if not isinstance(value, str):
            if known:
                raise _refuse(node_id, class_type, name, value,
                              "must be a file name written in the prompt (a link cannot be checked)")
            return value
        path, folder = _split_annotation(value)
        if folder == "temp":
            raise _refuse(node_id, class_type, name, value,
                          "cannot name a temp file (they are not kept per user); save it with SaveImage "
                          "and load it as 'name [output]'")
        parts = _relative_parts(path)
        if parts is None:
            raise _refuse(node_id, class_type, name, value,
                          "must be a relative file name without '..', '\\' or a leading '/'")
        if folder != "output" and self.shared_input_folder and parts[0] == self.shared_input_folder:
            return value  # the operator's shared inputs, the same for everyone
        if parts[0] != own:
            parts = [own, *parts]
        # ComfyUI cuts the annotation and the space before it by length: always write both.
        return "/".join(parts) + (f" [{folder}]" if folder else "")
