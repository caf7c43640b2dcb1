"""GET /templates (every template: name, description, the JSON Schema of its parameters) and
GET /templates/{name} (one). A template is submitted with ``POST /generate {template,
params}`` or the WebSocket's ``submit_prompt {template, params}``."""
from __future__ import annotations

from ..jobs.templates import TemplateRegistry
from .base import UserHandler


class TemplatesHandler(UserHandler):
    def initialize(self, verifier, metrics, templates: TemplateRegistry | None):
        super().initialize(verifier, metrics)
        self.templates = templates

    def get(self) -> None:
        found = self.templates.all() if self.templates is not None else []
        self.write_json({"templates": [t.summary() for t in found]})


class TemplateHandler(TemplatesHandler):
    def get(self, name: str) -> None:
        template = self.templates.get(name) if self.templates is not None else None
        if template is None:
            return self.write_json_error(404, "unknown_template", f"No template named {name[:64]!r}")
        self.write_json(template.summary())
