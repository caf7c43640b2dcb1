"""Workflow templates: an API-format workflow with ``${param}`` placeholders and a typed
parameter list, one JSON file each in TEMPLATES_DIR (declarative, never code).

A user sends ``{template, params}`` instead of a graph; ``render`` checks every parameter
(all the bad ones reported at once: the parameter, the rule, the value) and returns the API
prompt. A whole-value placeholder (``"steps": "${steps}"``) becomes the typed value (an
integer stays an integer); an embedded one (``"text": "a photo of ${subject}"``) is string
interpolation; ``$${`` is a literal ``${``.

A file is checked when it is loaded: unknown placeholders, parameters never used, defaults
that break their own rules, a UI-format graph... make it broken (reported with the file and
the reason, never loaded). ``TemplateRegistry`` reloads the directory on a timer; a broken
file never takes the others down, and a template that was good and became broken keeps its
last good version serving, reported as stale: an operator's half-saved edit or typo must not
break every client of a template that worked a second ago (the way nginx or Prometheus keep
their running configuration when a reload fails). Deleting the file removes the template.
"""
from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import re
import secrets
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

from tornado.ioloop import PeriodicCallback

from ..model import ErrorCode, RequestError

log = logging.getLogger(__name__)

SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"
TEMPLATE_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
PARAMETER_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
# "$${" (an escaped "${"), "${name}", or a "${" that is not closed
PLACEHOLDER = re.compile(r"\$\$\{|\$\{([^{}]*)\}|\$\{")
UPLOAD_NAME = re.compile(r"^[0-9a-f]{64}\.(?:png|jpg|gif|webp)$")  # what POST /upload returns
SEED_MAX = 2 ** 64 - 1  # ComfyUI's seed inputs: 0..0xffffffffffffffff
SHOWN_CHARS = 100  # of a bad value echoed in an error
MISSING = object()

TYPES = ("integer", "number", "string", "boolean", "enum", "seed", "image", "model")
COMMON_KEYS = frozenset({"type", "description", "default", "required", "title"})
TYPE_KEYS = {"integer": {"min", "max", "step"}, "number": {"min", "max", "step"},
             "string": {"min_length", "max_length"}, "boolean": set(), "enum": {"choices"}, "seed": set(),
             "image": set(), "model": {"folder"}}
TEMPLATE_KEYS = frozenset({"name", "description", "workflow", "parameters", "outputs"})

# model_exists(folder, name): True, False, or None (not known: left to ComfyUI's validation)
ModelExists = Callable[[str, str], "bool | None"]
# upload_reference(owner, name): the input value that names the owner's upload, None if they have none
UploadReference = Callable[[str, str], Awaitable["str | None"]]


class TemplateError(Exception):
    """A template file that cannot be loaded; ``str()`` is the reason."""


@dataclass(frozen=True)
class Parameter:
    name: str
    type: str
    description: str = ""
    title: str = ""
    default: Any = MISSING
    required: bool = False
    min: float | None = None
    max: float | None = None
    step: float | None = None
    choices: tuple = ()
    min_length: int | None = None
    max_length: int | None = None
    folder: str = ""

    def schema(self) -> dict:
        """This parameter as a JSON Schema (draft 2020-12)."""
        s: dict[str, Any] = {}
        if self.title:
            s["title"] = self.title
        words = [self.description] if self.description else []
        if self.type in ("integer", "number"):
            s["type"] = self.type
            if self.min is not None:
                s["minimum"] = self.min
            if self.max is not None:
                s["maximum"] = self.max
            if self.step is not None:
                if self.type == "integer" or (self.step * 1024).is_integer():
                    s["multipleOf"] = self.step
                else:  # (a validator's multipleOf fails on float rounding: 0.3 / 0.1 is 2.9999999999999996)
                    words.append(f"A multiple of {self.step:g}.")
        elif self.type == "string":
            s["type"] = "string"
            if self.min_length is not None:
                s["minLength"] = self.min_length
            if self.max_length is not None:
                s["maxLength"] = self.max_length
        elif self.type == "boolean":
            s["type"] = "boolean"
        elif self.type == "enum":
            s["enum"] = list(self.choices)
        elif self.type == "seed":
            s["anyOf"] = [{"type": "integer", "minimum": 0, "maximum": SEED_MAX}, {"const": "random"}]
            words.append("An integer seed, or \"random\" (the default) for one drawn by the proxy and reported "
                         "in the job's template params.")
        elif self.type == "image":
            s["type"] = "string"
            s["pattern"] = UPLOAD_NAME.pattern
            words.append("The name POST /upload returned for one of your own images.")
        elif self.type == "model":
            s["type"] = "string"
            s["minLength"] = 1
            words.append(f"A model file in the backend's {self.folder!r} folder.")
        if words:
            s["description"] = " ".join(words)
        if self.default is not MISSING:
            s["default"] = self.default
        return s


@dataclass(frozen=True)
class Template:
    name: str
    description: str
    workflow: dict
    parameters: dict[str, Parameter]
    outputs: tuple[str, ...] = ()
    file: str = ""

    def schema(self) -> dict:
        """The parameters as one JSON Schema (draft 2020-12) object."""
        return {"$schema": SCHEMA_DIALECT, "title": self.name, "description": self.description,
                "type": "object", "properties": {n: p.schema() for n, p in self.parameters.items()},
                "required": [n for n, p in self.parameters.items() if p.required],
                "additionalProperties": False}

    def summary(self) -> dict:
        return {"name": self.name, "description": self.description, "schema": self.schema(),
                "outputs": list(self.outputs)}


@dataclass(frozen=True)
class Rendered:
    """A template's prompt for one request, and the parameters it was made with (every one,
    defaults and drawn seeds included: submitting these again gives the same prompt)."""
    template: str
    prompt: dict
    params: dict
    outputs: tuple[str, ...] = ()


# --- parsing a file ---------------------------------------------------------------------------

def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _parameter(name: str, spec: Any) -> Parameter:
    where = f"parameter {name!r}"
    if not PARAMETER_NAME.match(name):
        raise TemplateError(f"{where}: a name is a letter or _ then letters, digits or _ (at most 64)")
    if not isinstance(spec, dict):
        raise TemplateError(f"{where}: must be an object {{type, default?, ...}}")
    kind = spec.get("type")
    if kind not in TYPES:
        raise TemplateError(f"{where}: type must be one of {', '.join(TYPES)}, not {kind!r}")
    unknown = sorted(set(spec) - COMMON_KEYS - TYPE_KEYS[kind])
    if unknown:
        raise TemplateError(f"{where}: unknown key {unknown[0]!r} for type {kind} "
                            f"(allowed: {', '.join(sorted(COMMON_KEYS | TYPE_KEYS[kind]))})")
    for key in ("description", "title", "folder"):
        if not isinstance(spec.get(key, ""), str):
            raise TemplateError(f"{where}: {key} must be a string")
    required = spec.get("required", False)
    if not isinstance(required, bool):
        raise TemplateError(f"{where}: required must be true or false")
    bounds = {}
    for key in ("min", "max", "step"):
        value = spec.get(key)
        if value is not None and not _number(value):
            raise TemplateError(f"{where}: {key} must be a number")
        if value is not None and kind == "integer" and not isinstance(value, int):
            raise TemplateError(f"{where}: {key} must be an integer for an integer parameter")
        bounds[key] = value
    if bounds["min"] is not None and bounds["max"] is not None and bounds["min"] > bounds["max"]:
        raise TemplateError(f"{where}: min {bounds['min']} is above max {bounds['max']}")
    if bounds["step"] is not None and bounds["step"] <= 0:
        raise TemplateError(f"{where}: step must be above 0")
    lengths = {}
    for key in ("min_length", "max_length"):
        value = spec.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise TemplateError(f"{where}: {key} must be an integer >= 0")
        lengths[key] = value
    if None not in lengths.values() and lengths["min_length"] > lengths["max_length"]:
        raise TemplateError(f"{where}: min_length is above max_length")
    choices = spec.get("choices", ())
    if kind == "enum":
        if (not isinstance(choices, list) or not choices
                or not all(isinstance(c, str) or _number(c) for c in choices)):
            raise TemplateError(f"{where}: choices must be a non-empty list of strings or numbers")
        if len({json.dumps(c) for c in choices}) != len(choices):
            raise TemplateError(f"{where}: choices has duplicates")
    if kind == "model" and not spec.get("folder"):
        raise TemplateError(f"{where}: a model parameter names its folder (e.g. \"folder\": \"checkpoints\")")
    parameter = Parameter(name, kind, spec.get("description", ""), spec.get("title", ""),
                          spec.get("default", MISSING), required, bounds["min"], bounds["max"], bounds["step"],
                          tuple(choices), lengths["min_length"], lengths["max_length"], spec.get("folder", ""))
    if parameter.default is not MISSING:
        if required:
            raise TemplateError(f"{where}: a required parameter has no default (give one or the other)")
        if kind == "image":
            raise TemplateError(f"{where}: an image parameter has no default (an upload belongs to one user)")
        if not (kind == "seed" and parameter.default == "random"):
            _, problems = check_value(parameter, parameter.default)
            if problems:
                raise TemplateError(f"{where}: its default breaks its own rules: {problems[0]['message']}")
    elif not required and kind != "seed":
        raise TemplateError(f"{where}: needs a default or \"required\": true")
    return parameter


def _placeholders(value: Any, where: str, found: set[str]) -> None:
    """Collect the placeholder names in every string value (keys may not hold any)."""
    if isinstance(value, str):
        for match in PLACEHOLDER.finditer(value):
            if match.group(0) == "$${":
                continue
            name = match.group(1)
            if name is None or not PARAMETER_NAME.match(name):
                raise TemplateError(f"{where}: malformed placeholder {match.group(0)[:40]!r} (write ${{name}}, "
                                    "or $${ for a literal ${)")
            found.add(name)
    elif isinstance(value, dict):
        for key, item in value.items():
            if "${" in key:
                raise TemplateError(f"{where}: a placeholder in a key ({key[:40]!r}); placeholders go in values")
            _placeholders(item, f"{where}.{key}", found)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _placeholders(item, f"{where}[{i}]", found)


def parse_template(name: str, data: Any, file: str = "") -> Template:
    """A template from a file's JSON document named ``name`` (its file name without .json).
    Raises TemplateError with the reason."""
    if not TEMPLATE_NAME.match(name):
        raise TemplateError("the file name must be <name>.json, the name being 1-64 of a-z 0-9 _ - "
                            "(starting with a letter or digit)")
    if not isinstance(data, dict):
        raise TemplateError("must be a JSON object {description, workflow, parameters}")
    if isinstance(data.get("nodes"), list) and "links" in data:
        raise TemplateError("this is a UI-format workflow (saved with Save), not a template: export the "
                            "workflow with 'Export (API)' and put it under \"workflow\"")
    unknown = sorted(set(data) - TEMPLATE_KEYS)
    if unknown:
        raise TemplateError(f"unknown key {unknown[0]!r} (allowed: {', '.join(sorted(TEMPLATE_KEYS))})")
    if data.get("name", name) != name:
        raise TemplateError(f"name {str(data['name'])[:64]!r} differs from the file's name {name!r}")
    description = data.get("description", "")
    if not isinstance(description, str):
        raise TemplateError("description must be a string")
    workflow = data.get("workflow")
    if not isinstance(workflow, dict) or not workflow:
        raise TemplateError("workflow must be a non-empty object (ComfyUI's API format: node id -> node)")
    if isinstance(workflow.get("nodes"), list) and "links" in workflow:
        raise TemplateError("workflow is in UI format (saved with Save): export it with 'Export (API)'")
    for node_id, node in workflow.items():
        if not isinstance(node, dict) or not isinstance(node.get("class_type"), str) \
                or not isinstance(node.get("inputs", {}), dict):
            raise TemplateError(f"workflow node {node_id[:64]!r} must be an object with a string class_type "
                                "and an object inputs (API format)")
    specs = data.get("parameters", {})
    if not isinstance(specs, dict):
        raise TemplateError("parameters must be an object (name -> {type, ...})")
    parameters = {n: _parameter(n, spec) for n, spec in specs.items()}
    used: set[str] = set()
    _placeholders(workflow, "workflow", used)
    unknown_used = sorted(used - set(parameters))
    if unknown_used:
        raise TemplateError(f"workflow uses ${{{unknown_used[0]}}}, which is not a parameter")
    unused = sorted(set(parameters) - used)
    if unused:
        raise TemplateError(f"parameter {unused[0]!r} is never used in the workflow")
    outputs = data.get("outputs", [])
    if not isinstance(outputs, list) or not all(isinstance(o, str) and o in workflow for o in outputs):
        raise TemplateError("outputs must be a list of the workflow's node ids")
    return Template(name, description, workflow, parameters, tuple(outputs), file)


def load_file(path: str, max_bytes: int) -> Template:
    """Read, parse and check one template file (blocking: run it in an executor)."""
    size = os.path.getsize(path)
    if size > max_bytes:
        raise TemplateError(f"{size} bytes, over TEMPLATES_MAX_FILE_BYTES={max_bytes}")
    with open(path, "rb") as f:
        raw = f.read(max_bytes + 1)
    if len(raw) > max_bytes:
        raise TemplateError(f"over TEMPLATES_MAX_FILE_BYTES={max_bytes}")
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise TemplateError("not UTF-8 text") from None
    except (ValueError, RecursionError) as e:
        raise TemplateError(f"not valid JSON: {e}") from None
    return parse_template(os.path.basename(path)[:-len(".json")], data, path)


# --- checking a request's parameters ------------------------------------------------------------

def _shown(value: Any) -> Any:
    if isinstance(value, str) and len(value) > SHOWN_CHARS:
        return value[:SHOWN_CHARS] + "..."
    if isinstance(value, (dict, list)):
        text = json.dumps(value)
        return text if len(text) <= SHOWN_CHARS else text[:SHOWN_CHARS] + "..."
    return value


def _problem(p: Parameter, rule: str, value: Any, message: str, **extra) -> dict:
    return {"parameter": p.name, "rule": rule, "value": _shown(value), "message": f"{p.name}: {message}", **extra}


def check_value(p: Parameter, value: Any) -> tuple[Any, list[dict]]:
    """(the typed value, the rules it breaks). The checks that need the outside world (an
    image upload, a model file) are made by the registry."""
    kind = p.type
    shown = json.dumps(_shown(value)) if not isinstance(value, str) else repr(_shown(value))
    if kind in ("integer", "seed"):
        if isinstance(value, float) and value.is_integer():
            value = int(value)  # 7.0 is an integer in JSON Schema too
        if isinstance(value, bool) or not isinstance(value, int):
            return value, [_problem(p, "type", value, f"{shown} is not an integer")]
        low, high = (0, SEED_MAX) if kind == "seed" else (p.min, p.max)
        if low is not None and value < low:
            return value, [_problem(p, "min", value, f"{value} is below the minimum {low}", limit=low)]
        if high is not None and value > high:
            return value, [_problem(p, "max", value, f"{value} is above the maximum {high}", limit=high)]
        if p.step is not None and value % p.step:
            return value, [_problem(p, "step", value, f"{value} is not a multiple of {p.step}", limit=p.step)]
        return value, []
    if kind == "number":
        if not _number(value):
            return value, [_problem(p, "type", value, f"{shown} is not a finite number")]
        value = float(value)
        if p.min is not None and value < p.min:
            return value, [_problem(p, "min", value, f"{value:g} is below the minimum {p.min:g}", limit=p.min)]
        if p.max is not None and value > p.max:
            return value, [_problem(p, "max", value, f"{value:g} is above the maximum {p.max:g}", limit=p.max)]
        if p.step is not None:
            steps = value / p.step  # (a multiple within float rounding: 0.3 of a step of 0.1 is one)
            if abs(steps - round(steps)) > 1e-9 * max(1.0, abs(steps)):
                return value, [_problem(p, "step", value, f"{value:g} is not a multiple of {p.step:g}",
                                        limit=p.step)]
        return value, []
    if kind == "boolean":
        if not isinstance(value, bool):
            return value, [_problem(p, "type", value, f"{shown} is not true or false")]
        return value, []
    if kind == "enum":
        for choice in p.choices:  # (1 == 1.0, but True is not 1 here)
            if type(choice) is type(value) and choice == value or (_number(choice) and _number(value)
                                                                  and choice == value):
                return choice, []
        listed = ", ".join(json.dumps(c) for c in p.choices[:20]) + (", ..." if len(p.choices) > 20 else "")
        return value, [_problem(p, "choices", value, f"{shown} is not one of {listed}")]
    # string, image, model
    if not isinstance(value, str):
        return value, [_problem(p, "type", value, f"{shown} is not a string")]
    if "\x00" in value:
        return value, [_problem(p, "type", value, "a string may not hold a NUL character")]
    if kind == "string":
        if p.min_length is not None and len(value) < p.min_length:
            return value, [_problem(p, "min_length", value, f"{len(value)} characters, fewer than "
                                                            f"{p.min_length}", limit=p.min_length)]
        if p.max_length is not None and len(value) > p.max_length:
            return value, [_problem(p, "max_length", value, f"{len(value)} characters, more than "
                                                            f"{p.max_length}", limit=p.max_length)]
        return value, []
    if kind == "image":
        if not UPLOAD_NAME.match(value):
            return value, [_problem(p, "format", value, f"{shown} is not an upload's name (the name POST "
                                                        "/upload returned: <sha256>.png|jpg|gif|webp)")]
        return value, []
    if not value or len(value) > 255:  # model
        return value, [_problem(p, "format", value, f"{shown} is not a model file name (1-255 characters)")]
    return value, []


def _text(value: Any) -> str:
    """A value embedded in a string (JSON's spelling of booleans)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return value if isinstance(value, str) else repr(value) if isinstance(value, float) else str(value)


def substitute(value: Any, values: dict) -> Any:
    """The workflow with every placeholder replaced (see the module doc)."""
    if isinstance(value, str):
        if "${" not in value:
            return value
        whole = PLACEHOLDER.fullmatch(value)
        if whole is not None and whole.group(1) is not None:
            return values[whole.group(1)]
        return PLACEHOLDER.sub(lambda m: "${" if m.group(0) == "$${" else _text(values[m.group(1)]), value)
    if isinstance(value, dict):
        return {k: substitute(v, values) for k, v in value.items()}
    if isinstance(value, list):
        return [substitute(v, values) for v in value]
    return value


def invalid_params(template: str, problems: list[dict]) -> RequestError:
    return RequestError(ErrorCode.INVALID_PARAMS,
                        f"Template {template!r}: " + "; ".join(p["message"] for p in problems),
                        details={"template": template, "errors": problems})


# --- the directory ------------------------------------------------------------------------------

@dataclass
class FileState:
    """What the registry knows of one file: its stat signature and how loading it went."""
    signature: tuple
    template: Template | None = None  # the version serving (the last good one)
    error: str = ""  # why the current content is broken ("" when it loaded)
    over_limit: bool = False  # beyond TEMPLATES_MAX_COUNT: not served


class TemplateRegistry:
    """The templates of one directory, one file each, reloaded when their files change
    (``refresh``, on a timer every ``interval_s``; 0: only the first load). ``render``
    answers requests. ``model_exists`` and ``upload_reference`` are the outside world's
    answers (a backend's model files, a user's uploads); ``draw_seed`` draws random seeds."""

    def __init__(self, directory: str, *, max_templates: int = 200, max_file_bytes: int = 1024 * 1024,
                 interval_s: float = 5.0, model_exists: ModelExists | None = None,
                 upload_reference: UploadReference | None = None, draw_seed: Callable[[], int] | None = None):
        self.directory = directory
        self.max_templates = max_templates
        self.max_file_bytes = max_file_bytes
        self.model_exists = model_exists
        self.upload_reference = upload_reference
        self.draw_seed = draw_seed or (lambda: secrets.randbits(64))
        self.files: dict[str, FileState] = {}  # file name -> state
        self.directory_error = ""  # why the directory itself cannot be read ("": it can)
        self._timer = PeriodicCallback(self._tick, interval_s * 1000) if interval_s > 0 else None
        self._refreshing: asyncio.Future | None = None

    # --- serving --------------------------------------------------------------------------------
    def get(self, name: str) -> Template | None:
        state = self.files.get(name + ".json")
        return state.template if state is not None and not state.over_limit else None

    def all(self) -> list[Template]:
        return [s.template for _, s in sorted(self.files.items()) if s.template is not None and not s.over_limit]

    def status(self) -> dict:
        """For /ready and /metrics: how many serve, which files are broken (``stale``: its
        last good version still serves)."""
        broken = []
        for file, state in sorted(self.files.items()):
            if state.error:
                broken.append({"file": file, "reason": state.error,
                               "stale": state.template is not None and not state.over_limit})
            elif state.over_limit:
                broken.append({"file": file, "reason": f"over TEMPLATES_MAX_COUNT={self.max_templates}",
                               "stale": False})
        data: dict[str, Any] = {"loaded": len(self.all()), "broken": broken}
        if self.directory_error:
            data["directory_error"] = self.directory_error
        return data

    async def render(self, owner: str, name: Any, params: Any) -> Rendered:
        """The API prompt of template ``name`` with ``params``; RequestError (unknown_template,
        invalid_params listing every bad parameter) otherwise."""
        template = self.get(name) if isinstance(name, str) else None
        if template is None:
            shown = _shown(name)
            raise RequestError(ErrorCode.UNKNOWN_TEMPLATE, f"No template named {shown!r}",
                               details={"template": shown})
        params = {} if params is None else params
        if not isinstance(params, dict):
            raise RequestError(ErrorCode.INVALID_PARAMS, "params must be an object (parameter name -> value)",
                               details={"template": name, "errors": []})
        problems: list[dict] = []
        for key in params:
            if key not in template.parameters:
                problems.append({"parameter": _shown(key), "rule": "unknown", "value": _shown(params[key]),
                                 "message": f"{_shown(key)}: not a parameter of this template "
                                            f"(its parameters: {', '.join(template.parameters) or 'none'})"})
        values: dict[str, Any] = {}
        images: dict[str, str] = {}
        for p in template.parameters.values():
            value = params.get(p.name, MISSING)
            if value is MISSING and p.required:
                problems.append(_problem(p, "required", None, "required, and missing"))
                continue
            if value is MISSING:
                value = p.default
            if p.type == "seed" and (value is MISSING or value == "random"):
                values[p.name] = self.draw_seed()  # reported in the params: the job can be made again
                continue
            typed, broken = check_value(p, value)
            if broken:
                problems.extend(broken)
                continue
            values[p.name] = typed
            if p.type == "image":
                images[p.name] = typed
            elif p.type == "model" and self.model_exists is not None and self.model_exists(p.folder, typed) is False:
                problems.append(_problem(p, "not_found", typed, f"{typed!r} is not a file in the backend's "
                                                                f"{p.folder!r} folder", folder=p.folder))
        references = {}
        for pname, upload in images.items():
            reference = await self.upload_reference(owner, upload) if self.upload_reference else None
            if reference is None:  # unknown and another user's alike
                problems.append(_problem(template.parameters[pname], "not_found", upload,
                                         f"{upload[:12]}... is not one of your uploads (POST /upload first)"))
            references[pname] = reference
        if problems:
            raise invalid_params(template.name, problems)
        prompt = substitute(template.workflow, {**values, **references})
        return Rendered(template.name, prompt, values, template.outputs)

    # --- loading --------------------------------------------------------------------------------
    def load(self) -> None:
        """The first load, synchronous (at start-up, before anything is served; bounded by
        TEMPLATES_MAX_COUNT files of at most TEMPLATES_MAX_FILE_BYTES)."""
        scan = self._scan()
        self._apply(scan, {f: self._load(f) for f in self._changed(scan)})

    async def refresh(self) -> None:
        """Reload what changed since the last look: the directory is listed and each changed
        file read in an executor; a file whose stat signature is unchanged is not read."""
        loop = asyncio.get_running_loop()
        scan = await loop.run_in_executor(None, self._scan)
        loaded = {}
        for file in self._changed(scan):
            loaded[file] = await loop.run_in_executor(None, self._load, file)
        self._apply(scan, loaded)

    def _scan(self) -> dict[str, tuple] | str:
        """file name -> (mtime_ns, size, inode) of the directory's *.json files, or why the
        directory cannot be read."""
        found = {}
        try:
            with os.scandir(self.directory) as entries:
                for entry in entries:
                    if not entry.name.endswith(".json") or entry.name.startswith("."):
                        continue
                    try:
                        if entry.is_file():
                            st = entry.stat()
                            found[entry.name] = (st.st_mtime_ns, st.st_size, st.st_ino)
                    except OSError:
                        continue  # (removed between the listing and the stat)
        except OSError as e:
            return f"cannot read the directory: {e.strerror or e}"
        return found

    def _changed(self, scan) -> list[str]:
        if isinstance(scan, str):
            return []
        return [f for f, sig in sorted(scan.items()) if f not in self.files or self.files[f].signature != sig]

    def _load(self, file: str) -> Template | str:
        try:
            return load_file(os.path.join(self.directory, file), self.max_file_bytes)
        except TemplateError as e:
            return str(e)
        except OSError as e:
            return f"cannot read: {e.strerror or e}"

    def _apply(self, scan, loaded: dict[str, Template | str]) -> None:
        """Take in a scan and the files read for it; log each change once."""
        if isinstance(scan, str):
            if scan != self.directory_error:
                log.error("templates: %s: %s (the templates loaded before keep serving)", self.directory, scan)
            self.directory_error = scan
            return
        self.directory_error = ""
        for file in [f for f in self.files if f not in scan]:
            log.info("templates: %s removed", file)
            del self.files[file]
        for file, result in loaded.items():
            state = self.files.setdefault(file, FileState(scan[file]))
            state.signature = scan[file]
            if isinstance(result, Template):
                log.info("templates: %s %s", "reloaded" if state.template else "loaded", file)
                state.template, state.error = result, ""
            elif state.template is not None:
                state.error = result
                log.error("templates: %s is broken, its last good version keeps serving (stale): %s", file, result)
            else:
                state.error = result
                log.error("templates: %s is broken, not loaded: %s", file, result)
        serving = 0  # at most max_templates serve: the first ones by file name
        for file, state in sorted(self.files.items()):
            if state.template is None:
                continue
            serving += 1
            over = serving > self.max_templates
            if over and not state.over_limit:
                log.error("templates: %s not served: over TEMPLATES_MAX_COUNT=%d", file, self.max_templates)
            state.over_limit = over

    # --- the timer ------------------------------------------------------------------------------
    def start(self) -> None:
        if self._timer is not None:
            self._timer.start()

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.stop()
        if self._refreshing is not None:
            self._refreshing.cancel()
            self._refreshing = None

    def _tick(self) -> None:
        if self._refreshing is None or self._refreshing.done():  # never two at once
            self._refreshing = asyncio.ensure_future(self._refresh_logged())

    async def _refresh_logged(self) -> None:
        try:
            await self.refresh()
        except Exception:
            log.exception("templates: reloading %s failed", self.directory)
