"""Validation before ComfyUI: ComfyUI 0.3.64's own verdict on an API-format prompt, from
its ``/object_info``, without the round trip (pure functions: no I/O).

``validate_prompt`` answers ``None`` where ComfyUI would queue the prompt, else the very body
of ComfyUI's HTTP 400 (``{"error": {...}, "node_errors": {...}}``), so a client has one error
path whoever refused. It follows ``execution.validate_prompt`` / ``validate_inputs`` of
ComfyUI 0.3.64 (commit a125cd84) step by step, Python semantics included (the conversions,
comparisons and look-ups are the same Python operations, so they fail with the same
exceptions and messages), and is held against a real 0.3.64's answers in
``tests/test_validate.py``. docs/validation.rst lists what it checks and what it leaves to
ComfyUI (node code: ``VALIDATE_INPUTS``; tracebacks; ...).

Three departures, each on purpose:

* ComfyUI recurses from each output through the links (one Python frame per node, so a link
  chain deeper than about 975 nodes fails there with a ``RecursionError``). Here the
  recursion runs on an explicit stack of generators (``_checker``): same order, same
  memoisation, same exceptions caught at the same places, no recursion limit of our own.
  ComfyUI's limit is kept as a verdict: a chain that reaches ``COMFY_MAX_DEPTH`` (1000, where
  ComfyUI fails whatever its stack) is refused as ComfyUI refuses it; between ~975 and 1000
  the verdict is left to ComfyUI.
* ComfyUI walks two sets (the output nodes, a node's declared inputs), so the order of
  ``node_errors``, of a node's errors and of ``dependent_outputs`` depends on its process'
  hash seed. By default the validator uses the prompt's order and ``input_order``;
  ``set_key`` (a str -> hashable wrapper) rebuilds ComfyUI's sets with chosen hashes, which is
  how the tests reproduce a recorded process byte for byte.
* A traceback names server paths: ``exception_during_(inner_)validation`` carries an empty
  ``traceback`` list.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Collection, Hashable, Iterable, Mapping

# Inputs that a core node's own VALIDATE_INPUTS / validate_inputs takes (ComfyUI 0.3.64): for
# those ComfyUI skips the range and list checks and runs node code instead, which is left to
# it. "input_types" means the node checks its links' types itself; "**" stands for **kwargs.
CUSTOM_VALIDATED: Mapping[str, frozenset[str]] = {
    "LoadImage": frozenset({"image"}),
    "LoadImageMask": frozenset({"image"}),
    "LoadImageOutput": frozenset({"image"}),
    "LoadLatent": frozenset({"latent"}),
    "LoadAudio": frozenset({"audio"}),
    "LoadVideo": frozenset({"file"}),
    "FluxProUltraImageNode": frozenset({"aspect_ratio"}),
    "KlingCameraControls": frozenset({"horizontal_movement", "vertical_movement", "pan", "tilt", "roll", "zoom"}),
    "TripoConversionNode": frozenset({"input_types"}),
}
ALL_INPUTS = "**"
# ComfyUI's recursion limit (sys.getrecursionlimit() is 1000 there, and every validated node
# of a chain costs at least one frame): a validation this deep fails there for certain.
COMFY_MAX_DEPTH = 1000
RECURSION_MESSAGE = "maximum recursion depth exceeded while calling a Python object"
COMBO_SET_MIN = 16  # combo lists from this length are looked up through a set (model lists)
LIST_SHOWN_MAX = 20  # ComfyUI names the allowed values of lists up to this length

UI_WORKFLOW_MESSAGE = ("This is a UI-format workflow (saved with 'Save'); export it with 'Export (API)' "
                       "(Workflow menu) and send that")


def is_ui_workflow(prompt: Any) -> bool:
    """A graph saved with "Save" (the editor's format: ``nodes`` and ``links`` lists,
    ``last_node_id``, ``version``...) instead of "Export (API)". ComfyUI itself answers such
    a prompt with a 500 or ``Cannot execute because a node is missing the class_type property``."""
    if not isinstance(prompt, dict) or not isinstance(prompt.get("nodes"), list):
        return False
    return any(key in prompt for key in ("links", "last_node_id", "last_link_id", "version", "state"))


def _error(kind: str, message: str, details: str = "") -> dict:
    return {"type": kind, "message": message, "details": details, "extra_info": {}}


@dataclass
class Verdict:
    """ComfyUI's answer: the outputs it would run, its ``error`` (None: queued) and the
    ``node_errors`` of the outputs it refused (present in its 200 answer too)."""

    outputs: list[str] = field(default_factory=list)
    error: dict | None = None
    node_errors: dict = field(default_factory=dict)

    @property
    def body(self) -> dict | None:
        """ComfyUI's HTTP 400 body, or None when it would accept the prompt."""
        return None if self.error is None else {"error": self.error, "node_errors": self.node_errors}


def validate_prompt(prompt: dict, object_info: dict, partial_targets: list[str] | None = None, *,
                    custom_validated: Mapping[str, Collection[str]] = CUSTOM_VALIDATED,
                    set_key: Callable[[str], Hashable] | None = None,
                    max_depth: int | None = COMFY_MAX_DEPTH) -> dict | None:
    """None when ComfyUI 0.3.64 with this ``/object_info`` would accept the API-format
    ``prompt``, else the JSON body of its HTTP 400 answer. See ``check_prompt``."""
    return check_prompt(prompt, object_info, partial_targets, custom_validated=custom_validated,
                        set_key=set_key, max_depth=max_depth).body


def check_prompt(prompt: dict, object_info: dict, partial_targets: list[str] | None = None, *,
                 custom_validated: Mapping[str, Collection[str]] = CUSTOM_VALIDATED,
                 set_key: Callable[[str], Hashable] | None = None,
                 max_depth: int | None = COMFY_MAX_DEPTH) -> Verdict:
    """ComfyUI's ``validate_prompt``: the whole verdict.

    ``custom_validated`` names, per class, the inputs its node code validates (see
    ``CUSTOM_VALIDATED``; add custom nodes' own). ``set_key`` None: deterministic orders;
    else ComfyUI's sets are rebuilt from ``set_key(name)`` items. ``max_depth`` None: no
    emulation of ComfyUI's recursion limit."""
    outputs: list = []
    for node_id in prompt:
        node = prompt[node_id]
        if not isinstance(node, dict) or "class_type" not in node:
            return Verdict(error=_error("invalid_prompt", "Cannot execute because a node is missing the class_type "
                                        "property.", f"Node ID '#{node_id}'"))
        class_type = node["class_type"]
        # ComfyUI's look-up of an unhashable class_type raises (a 500 there): refused as unknown.
        info = object_info.get(class_type) if isinstance(class_type, Hashable) else None
        if not isinstance(info, dict):
            return Verdict(error=_error("invalid_prompt", f"Cannot execute because node {class_type} does not exist.",
                                        f"Node ID '#{node_id}'"))
        if info.get("output_node") is True and (partial_targets is None or node_id in partial_targets):
            outputs.append(node_id)
    if not outputs:
        return Verdict(error=_error("prompt_no_outputs", "Prompt has no outputs"))
    run = _Run(prompt, object_info, custom_validated, set_key, max_depth)
    if set_key is not None:
        outputs = list(_added_set(set_key, outputs))
    good: list = []
    failures: list[tuple[Any, list]] = []
    node_errors: dict = {}
    for output in outputs:
        try:
            valid, reasons, _ = run.validate(output)
        except Exception as ex:  # noqa: BLE001 - ComfyUI reports it in the answer
            valid, reasons = False, [{"type": "exception_during_validation",
                                      "message": "Exception when validating node", "details": str(ex),
                                      "extra_info": {"exception_type": _type_name(ex), "traceback": []}}]
            run.validated[output] = (False, reasons, output)
        if valid is True:
            good.append(output)
            continue
        failures.append((output, reasons))
        run.blame(output, node_errors)
    if set_key is not None:
        good = [str(o) for o in _added_set(set_key, good)]
    run.finish(node_errors)
    if not good:
        details = "\n".join(f"{r['message']}: {r['details']}" for _, reasons in failures for r in reasons)
        return Verdict(good, _error("prompt_outputs_failed_validation", "Prompt outputs failed validation", details),
                       node_errors)
    return Verdict(good, None, node_errors)


def _added_set(set_key: Callable[[str], Hashable], items: Iterable) -> list:
    """list(s) of a set built with s.add(item), as ComfyUI builds its output sets."""
    s: set = set()
    for item in items:
        s.add(set_key(item))
    return [str(x) for x in s]


def _type_name(ex: BaseException) -> str:
    """ComfyUI's full_type_name of the exception's class."""
    klass = type(ex)
    return klass.__qualname__ if klass.__module__ == "builtins" else f"{klass.__module__}.{klass.__qualname__}"


def types_match(received: Any, expected: Any) -> bool:
    """ComfyUI's validate_node_input (not strict) as its node types make it behave: ``*``
    on either side matches anything (IO.ANY and the AnyType of custom nodes override ``!=``;
    a plain "*" string without that override would not match, which is left to ComfyUI),
    else equal, else one common type among the comma-separated ones."""
    if received == "*" or expected == "*":
        return True
    if not received != expected:
        return True
    if not isinstance(received, str) or not isinstance(expected, str):
        return False
    return bool({t.strip() for t in received.split(",")} & {t.strip() for t in expected.split(",")})


def _is_v3(info: dict) -> bool:
    """A V3 node (comfy_api io.ComfyNode): its /object_info is a dataclass' asdict, with
    every field; its RETURN_TYPES is a list, where V1 nodes have a tuple."""
    return all(key in info for key in ("deprecated", "experimental", "api_node", "output_tooltips"))


class _Run:
    """One validation: the memo (ComfyUI's ``validated``) and the per-class tables."""

    def __init__(self, prompt: dict, object_info: dict, custom_validated: Mapping[str, Collection[str]],
                 set_key: Callable[[str], Hashable] | None, max_depth: int | None):
        self.prompt = prompt
        self.object_info = object_info
        self.custom_validated = custom_validated
        self.set_key = set_key
        self.max_depth = max_depth
        self.validated: dict = {}
        self._inputs: dict = {}  # class -> its declared inputs, in ComfyUI's order
        self._returns: dict = {}  # class -> RETURN_TYPES (tuple or list, as ComfyUI has it)
        self._combos: dict = {}  # (class, input) -> frozenset of a long combo list's values
        # dependent_outputs: ComfyUI appends every refused output to every node that has errors
        # so far. Recorded as (node, first index) and expanded once at the end.
        self._failed_outputs: list = []
        self._first_blamed: dict = {}  # node id -> index in _failed_outputs of its first output
        self._seen = 0  # how many entries of validated were looked at by blame()

    # --- tables ---------------------------------------------------------------------------------
    def declared_inputs(self, class_type: str) -> list:
        names = self._inputs.get(class_type)
        if names is None:
            inputs = self.object_info[class_type].get("input", {})
            required, optional = inputs.get("required", {}), inputs.get("optional", {})
            if self.set_key is None:
                order = self.object_info[class_type].get("input_order", {})
                names = list(dict.fromkeys([*order.get("required", required), *order.get("optional", optional)]))
                names = [n for n in names if n in required or n in optional]
            else:  # set(required).union(set(optional)), as ComfyUI builds it
                key = self.set_key
                names = [str(n) for n in set(dict.fromkeys(key(n) for n in required)).union(
                    set(dict.fromkeys(key(n) for n in optional)))]
            self._inputs[class_type] = names
        return names

    def returns(self, class_type: str):
        types = self._returns.get(class_type)
        if types is None:
            info = self.object_info[class_type]
            types = list(info.get("output", [])) if _is_v3(info) else tuple(info.get("output", ()))
            self._returns[class_type] = types
        return types

    def in_combo(self, class_type: str, name: str, value: Any, options: list) -> bool:
        if len(options) < COMBO_SET_MIN or not isinstance(value, Hashable):
            return value in options
        key = (class_type, name)
        values = self._combos.get(key)
        if values is None:
            try:
                values = self._combos[key] = frozenset(options)
            except TypeError:  # unhashable options: the list it is
                return value in options
        return value in values

    # --- the recursion, on an explicit stack ---------------------------------------------------------
    def validate(self, root: Any) -> tuple:
        """ComfyUI's ``await validate_inputs(prompt, root, validated)``."""
        if root in self.validated:
            return self.validated[root]
        stack = [self._checker(root)]
        sent: Any = None
        thrown: BaseException | None = None
        while True:
            gen = stack[-1]
            try:
                child = gen.throw(thrown) if thrown is not None else gen.send(sent)
            except StopIteration as done:
                stack.pop()
                if not stack:
                    return done.value
                sent, thrown = done.value, None
                continue
            except Exception as ex:  # noqa: BLE001 - raised to the caller, as the recursion would
                stack.pop()
                if not stack:
                    raise
                sent, thrown = None, ex
                continue
            sent, thrown = None, None
            if child in self.validated:
                sent = self.validated[child]
            elif self.max_depth is not None and len(stack) >= self.max_depth:
                thrown = RecursionError(RECURSION_MESSAGE)
            else:
                stack.append(self._checker(child))

    def _checker(self, unique_id: Any):
        """ComfyUI's validate_inputs for one node, as a generator: it yields the id of a node
        it needs the verdict of, and is sent that verdict (or thrown its exception)."""
        prompt = self.prompt
        inputs = prompt[unique_id]["inputs"]
        class_type = prompt[unique_id]["class_type"]
        declared = self.object_info[class_type].get("input", {})
        custom = self.custom_validated.get(class_type, ())
        own_checks = ALL_INPUTS not in custom
        errors: list = []
        valid = True
        for x in self.declared_inputs(class_type):
            input_type, input_category, extra_info = _input_info(declared, x)
            if extra_info is None:
                raise AssertionError()
            if x not in inputs:
                if input_category == "required":
                    errors.append({"type": "required_input_missing", "message": "Required input is missing",
                                   "details": f"{x}", "extra_info": {"input_name": x}})
                continue
            val = inputs[x]
            info = [input_type, extra_info]
            if isinstance(val, list):
                if len(val) != 2:
                    errors.append({"type": "bad_linked_input",
                                   "message": "Bad linked input, must be a length-2 list of [node_id, slot_index]",
                                   "details": f"{x}", "extra_info": {"input_name": x, "input_config": info,
                                                                     "received_value": val}})
                    continue
                o_id = val[0]
                o_class_type = prompt[o_id]["class_type"]
                received_type = self.returns(o_class_type)[val[1]]
                if "input_types" not in custom and not types_match(received_type, input_type):
                    errors.append({"type": "return_type_mismatch",
                                   "message": "Return type mismatch between linked nodes",
                                   "details": f"{x}, received_type({received_type}) mismatch input_type({input_type})",
                                   "extra_info": {"input_name": x, "input_config": info,
                                                  "received_type": received_type, "linked_node": val}})
                    continue
                try:
                    r = yield o_id
                    if r[0] is False:
                        valid = False
                        continue
                except Exception as ex:  # noqa: BLE001 - ComfyUI reports it in the answer
                    valid = False
                    self.validated[o_id] = (False, [{
                        "type": "exception_during_inner_validation", "message": "Exception when validating inner node",
                        "details": str(ex), "extra_info": {
                            "input_name": x, "input_config": info, "exception_message": str(ex),
                            "exception_type": _type_name(ex), "traceback": [], "linked_node": val}}], o_id)
                    continue
            else:
                try:
                    if isinstance(val, dict) and "__value__" in val:
                        val = val["__value__"]
                    if input_type == "INT":
                        val = int(val)
                    if input_type == "FLOAT":
                        val = float(val)
                    if input_type == "STRING":
                        val = str(val)
                    if input_type == "BOOLEAN":
                        val = bool(val)
                except Exception as ex:  # noqa: BLE001 - ComfyUI reports it in the answer
                    errors.append({"type": "invalid_input_type",
                                   "message": f"Failed to convert an input value to a {input_type} value",
                                   "details": f"{x}, {val}, {ex}",
                                   "extra_info": {"input_name": x, "input_config": info, "received_value": val,
                                                  "exception_message": str(ex)}})
                    continue
                if x not in custom and own_checks:
                    if "min" in extra_info and val < extra_info["min"]:
                        errors.append({"type": "value_smaller_than_min",
                                       "message": "Value {} smaller than min of {}".format(val, extra_info["min"]),
                                       "details": f"{x}", "extra_info": {"input_name": x, "input_config": info,
                                                                         "received_value": val}})
                        continue
                    if "max" in extra_info and val > extra_info["max"]:
                        errors.append({"type": "value_bigger_than_max",
                                       "message": "Value {} bigger than max of {}".format(val, extra_info["max"]),
                                       "details": f"{x}", "extra_info": {"input_name": x, "input_config": info,
                                                                         "received_value": val}})
                        continue
                    if isinstance(input_type, list) and not self.in_combo(class_type, x, val, input_type):
                        input_config: list | None = info
                        if len(input_type) > LIST_SHOWN_MAX:
                            list_info = f"(list of length {len(input_type)})"
                            input_config = None
                        else:
                            list_info = str(input_type)
                        errors.append({"type": "value_not_in_list", "message": "Value not in list",
                                       "details": f"{x}: '{val}' not in {list_info}",
                                       "extra_info": {"input_name": x, "input_config": input_config,
                                                      "received_value": val}})
                        continue
        ret = (False, errors, unique_id) if errors or valid is not True else (True, [], unique_id)
        self.validated[unique_id] = ret
        return ret

    # --- node_errors ----------------------------------------------------------------------------
    def blame(self, output: Any, node_errors: dict) -> None:
        """For a refused output: every node of ``validated`` with errors of its own enters
        node_errors (first come, first listed) and names this output, like every refused
        output before it since it entered (ComfyUI's loop over ``validated``, done once)."""
        entries = list(self.validated.items())
        for node_id, (node_valid, reasons, _) in entries[self._seen:]:
            if node_valid is not True and len(reasons) > 0 and node_id not in node_errors:
                node_errors[node_id] = {"errors": reasons, "dependent_outputs": [],
                                        "class_type": self.prompt[node_id]["class_type"]}
                self._first_blamed[node_id] = len(self._failed_outputs)
        self._seen = len(entries)
        self._failed_outputs.append(output)

    def finish(self, node_errors: dict) -> None:
        for node_id, first in self._first_blamed.items():
            node_errors[node_id]["dependent_outputs"] = self._failed_outputs[first:]


def _input_info(declared: dict, name: str) -> tuple:
    """ComfyUI's get_input_info on the class' declared inputs: (type, category, extra)."""
    for category in ("required", "optional", "hidden"):
        group = declared.get(category)
        if group and name in group:
            decl = group[name]
            return decl[0], category, (decl[1] if len(decl) > 1 else {})
    return None, None, None
