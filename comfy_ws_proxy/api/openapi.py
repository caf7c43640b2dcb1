"""GET /openapi.json (the jobs API as OpenAPI 3.1) and GET /docs (a page that shows it and
needs nothing from the internet)."""
from __future__ import annotations

import json

from .base import JsonHandler

ERROR = {"$ref": "#/components/schemas/Error"}
JOB = {"$ref": "#/components/schemas/Job"}
STATUSES = ["pending", "processing", "completed", "failed", "cancelled", "timed_out"]


def _json(schema: dict, description: str) -> dict:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(*codes: int) -> dict:
    words = {400: "Bad request (invalid_message)", 401: "No valid token (unauthorized)",
             404: "No such job: unknown and another user's alike (not_found)", 409: "Conflict",
             413: "Body too large (message_too_large)",
             422: "Refused (invalid_prompt, invalid_params, unknown_template, idempotency_key_reuse)",
             429: "Too many (rate_limited, queue_full, too_many_downloads, too_many_streams); see Retry-After",
             503: "ComfyUI or the store unavailable; try again"}
    return {str(c): _json(ERROR, words[c]) for c in codes}


def _template_schemas(templates) -> dict:
    """The components of template submissions: each template's parameters (its own JSON
    Schema, without ``$schema``: the document's dialect is 2020-12 already) and the
    submission that names it."""
    found = templates.all() if templates is not None else []
    schemas: dict = {}
    choices = []
    for template in found:
        params = {k: v for k, v in template.schema().items() if k != "$schema"}
        schemas[f"TemplateParams_{template.name}"] = params
        choices.append({"type": "object", "required": ["template"], "properties": {
            "template": {"const": template.name},
            "params": {"$ref": f"#/components/schemas/TemplateParams_{template.name}"}}})
    submission = {"type": "object", "required": ["template"],
                  "description": "A template's name and its parameters (GET /templates), instead of a prompt",
                  "properties": {"template": {"type": "string"}, "params": {"type": "object"},
                                 "prompt_id": {"type": "string", "format": "uuid"},
                                 "extra_data": {"type": "object"},
                                 "partial_execution_targets": {"type": "array", "items": {"type": "string"}},
                                 "timeout_s": {"type": "number", "exclusiveMinimum": 0},
                                 "webhook_url": {"type": "string", "format": "uri"}}}
    if choices:
        submission["oneOf"] = choices
    schemas["TemplateSubmission"] = submission
    schemas["Template"] = {"type": "object", "required": ["name", "schema"], "properties": {
        "name": {"type": "string"}, "description": {"type": "string"},
        "schema": {"type": "object", "description": "The parameters, as a JSON Schema (draft 2020-12)"},
        "outputs": {"type": "array", "items": {"type": "string"}}}}
    return schemas


def document(settings, prefix: str = "", version: str = "", templates=None) -> dict:
    job_id = {"name": "job_id", "in": "path", "required": True, "schema": {"type": "string", "format": "uuid"}}
    prefer = {"name": "Prefer", "in": "header", "required": False, "schema": {"type": "string"},
              "description": f"wait=N: wait up to N seconds (at most {settings.max_wait_s:g}) for the job to end."}
    key = {"name": "Idempotency-Key", "in": "header", "required": False,
           "schema": {"type": "string", "maxLength": 255},
           "description": "Makes a retried POST safe (draft-ietf-httpapi-idempotency-key-header): per user; the "
                          "same key and body replay the recorded answer (Idempotency-Replayed: true); another body "
                          f"is 422; one still being accepted is 409. Keys expire after "
                          f"{settings.idempotency_key_ttl_s} s."}
    submit = {"tags": ["jobs"], "summary": "Submit a job", "parameters": [key, prefer],
              "requestBody": {"required": True, "content": {"application/json": {"schema": {
                  "oneOf": [{"$ref": "#/components/schemas/Submission"},
                            {"$ref": "#/components/schemas/Workflow"},
                            {"$ref": "#/components/schemas/TemplateSubmission"}]}}}},
              "responses": {"202": _json(JOB, "Accepted: recorded, to run"),
                            "200": _json(JOB, "Already ended (within Prefer: wait)"),
                            **_errors(400, 401, 409, 413, 422, 429, 503)}}
    paths = {
        "/generate": {"post": submit},
        "/jobs": {
            "post": {**submit, "summary": "Submit a job (alias of /generate)", "operationId": "submitJob"},
            "get": {"tags": ["jobs"], "summary": "The caller's jobs, newest first", "operationId": "listJobs",
                    "parameters": [
                        {"name": "status", "in": "query", "schema": {"type": "string"},
                         "description": "Comma-separated: " + ", ".join(STATUSES)},
                        {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 100}},
                        {"name": "cursor", "in": "query", "schema": {"type": "string"}}],
                    "responses": {"200": _json({"type": "object", "properties": {
                        "jobs": {"type": "array", "items": JOB},
                        "next_cursor": {"type": ["string", "null"]}}}, "A page"), **_errors(400, 401)}}},
        "/upload": {"post": {
            "tags": ["jobs"], "summary": "Upload an image for LoadImage", "operationId": "upload",
            "requestBody": {"required": True, "content": {
                "multipart/form-data": {"schema": {"type": "object", "properties": {
                    "image": {"type": "string", "format": "binary"}}}},
                "image/*": {"schema": {"type": "string", "format": "binary"}}}},
            "responses": {"201": _json({"type": "object", "properties": {
                "name": {"type": "string"}, "size": {"type": "integer"}, "content_type": {"type": "string"},
                "sha256": {"type": "string"}, "use": {"type": "object"}}},
                f"Stored (at most {settings.upload_max_bytes} bytes): use its name in LoadImage"),
                "415": _json(ERROR, "Not a PNG, JPEG, GIF or WebP image"), **_errors(400, 401, 413, 503)}}},
        "/templates": {"get": {
            "tags": ["templates"], "summary": "The workflow templates: name, description, parameters' schema",
            "operationId": "listTemplates",
            "responses": {"200": _json({"type": "object", "properties": {"templates": {
                "type": "array", "items": {"$ref": "#/components/schemas/Template"}}}}, "Every template"),
                **_errors(401)}}},
        "/templates/{name}": {"get": {
            "tags": ["templates"], "summary": "One template", "operationId": "getTemplate",
            "parameters": [{"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}],
            "responses": {"200": _json({"$ref": "#/components/schemas/Template"}, "The template"),
                          "404": _json(ERROR, "No such template (unknown_template)"), **_errors(401)}}},
        "/job/{job_id}": {"get": {"tags": ["jobs"], "summary": "A job", "operationId": "getJob",
                                  "parameters": [job_id, prefer],
                                  "responses": {"200": _json(JOB, "The job"), **_errors(401, 404)}}},
        "/job/{job_id}/cancel": {"post": {
            "tags": ["jobs"], "summary": "Cancel a job (idempotent)", "operationId": "cancelJob",
            "parameters": [job_id],
            "responses": {"200": _json(JOB, "Cancelled"), "202": _json(JOB, "Cancelling"),
                          **_errors(401, 404, 409, 503)}}},
        "/job/{job_id}/events": {"get": {
            "tags": ["jobs"], "summary": "The job's events (Server-Sent Events)", "operationId": "jobEvents",
            "parameters": [job_id, {"name": "Last-Event-ID", "in": "header", "schema": {"type": "string"},
                                    "description": "Resume after this event id (<epoch>-<offset>)"}],
            "responses": {"200": {"description": "snapshot, status, progress, output, preview, done",
                                  "content": {"text/event-stream": {"schema": {"type": "string"}}}},
                          **_errors(401, 404, 429)}}},
        "/job/{job_id}/image/{node_id}/{index}": {"get": {
            "tags": ["jobs"], "summary": "One output file's bytes", "operationId": "getOutput",
            "parameters": [job_id, {"name": "node_id", "in": "path", "required": True, "schema": {"type": "string"}},
                           {"name": "index", "in": "path", "required": True,
                            "schema": {"type": "integer", "minimum": 0}},
                           {"name": "Range", "in": "header", "schema": {"type": "string"}},
                           {"name": "If-None-Match", "in": "header", "schema": {"type": "string"}}],
            "responses": {"200": {"description": "The file", "content": {"*/*": {"schema": {
                "type": "string", "format": "binary"}}}},
                "206": {"description": "A range of it"}, "304": {"description": "Not modified"},
                "416": {"description": "Range not satisfiable"}, **_errors(401, 404, 429, 503)}}},
    }
    string_or_null = {"type": ["string", "null"]}
    schemas = {
        "Error": {"type": "object", "required": ["error"], "properties": {"error": {
            "type": "object", "required": ["code", "message"],
            "properties": {"code": {"type": "string"}, "message": {"type": "string"},
                           "prompt_id": {"type": "string"}, "details": {},
                           "node_errors": {"type": "object", "description": "ComfyUI's, unchanged"}}}}},
        "Workflow": {"type": "object", "description": "A workflow in ComfyUI's API format (node id -> node)",
                     "additionalProperties": {"type": "object", "required": ["class_type"]}},
        "Submission": {"type": "object", "required": ["prompt"], "properties": {
            "prompt": {"$ref": "#/components/schemas/Workflow"},
            "prompt_id": {"type": "string", "format": "uuid"}, "extra_data": {"type": "object"},
            "partial_execution_targets": {"type": "array", "items": {"type": "string"}},
            "timeout_s": {"type": "number", "exclusiveMinimum": 0},
            "webhook_url": {"type": "string", "format": "uri",
                            "description": "Where the outcome is POSTed (Standard Webhooks)"}}},
        "Job": {"type": "object", "required": ["job_id", "status"], "properties": {
            "job_id": {"type": "string", "format": "uuid"}, "status": {"type": "string", "enum": STATUSES},
            "state": {"type": "string"}, "created_at": string_or_null, "started_at": string_or_null,
            "completed_at": string_or_null, "expires_at": string_or_null,
            "queue_position": {"type": ["integer", "null"]},
            "progress": {"type": "object", "properties": {
                "value": {"type": "number"}, "nodes_done": {"type": "integer"},
                "nodes_total": {"type": ["integer", "null"]}, "current_node": string_or_null,
                "current_node_class": string_or_null, "step": {"type": ["number", "null"]},
                "steps": {"type": ["number", "null"]}}},
            "outputs": {"type": "array", "items": {"type": "object", "properties": {
                "node_id": {"type": "string"}, "index": {"type": "integer"}, "kind": {"type": "string"},
                "filename": {"type": "string"}, "subfolder": {"type": "string"}, "type": {"type": "string"},
                "content_type": {"type": "string"}, "url": {"type": "string"}}}},
            "error": {"type": ["object", "null"]},
            "urls": {"type": "object", "additionalProperties": {"type": "string"}},
            "template": {"type": ["object", "null"], "description": "The template it was made from: {name, "
                         "params}, every parameter resolved (a random seed as drawn)"}}},
        **_template_schemas(templates),
    }
    return {"openapi": "3.1.0",
            "info": {"title": "comfy_ws_proxy jobs API", "version": version,
                     "description": "The same users and jobs as the WebSocket at /ws. Every endpoint takes the "
                                    "same bearer JWT."},
            "servers": [{"url": (settings.public_url or "").rstrip("/") + prefix or "/"}],
            "security": [{"bearer": []}],
            "paths": paths,
            "components": {"schemas": schemas,
                           "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}}}}


class OpenApiHandler(JsonHandler):
    def initialize(self, settings, prefix: str, version: str, templates=None):
        # (built for each request: the templates are reloaded while the proxy runs)
        self.document = json.dumps(document(settings, prefix, version, templates), separators=(",", ":"))

    def get(self):
        self.set_header("Cache-Control", "no-cache")
        self.finish(self.document)


DOCS_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>comfy_ws_proxy jobs API</title>
<style>body{font:15px system-ui,sans-serif;max-width:60em;margin:2em auto;padding:0 1em}
code,pre{background:#f4f4f4;padding:.1em .3em}h2{margin-top:1.5em}.m{font-weight:bold;text-transform:uppercase}
li{margin:.2em 0}</style></head><body>
<h1>comfy_ws_proxy jobs API</h1><p>The document itself: <a href="openapi.json">openapi.json</a></p>
<div id="api">Loading...</div>
<script>
fetch("openapi.json").then(r => r.json()).then(doc => {
  const root = document.getElementById("api"); root.textContent = "";
  const el = (tag, text) => { const e = document.createElement(tag); if (text) e.textContent = text; return e; };
  root.append(el("p", doc.info.description));
  for (const [path, ops] of Object.entries(doc.paths)) {
    for (const [method, op] of Object.entries(ops)) {
      const h = el("h2"); const m = el("span", method + " "); m.className = "m"; h.append(m, el("code", path));
      root.append(h, el("p", op.summary));
      const params = el("ul");
      for (const p of op.parameters || []) params.append(el("li", p.in + " " + p.name + (p.description ? ": " + p.description : "")));
      if (params.children.length) root.append(el("p", "Parameters:"), params);
      const answers = el("ul");
      for (const [code, r] of Object.entries(op.responses)) answers.append(el("li", code + " " + r.description));
      root.append(el("p", "Answers:"), answers);
    }
  }
});
</script></body></html>
"""


class DocsHandler(JsonHandler):
    def get(self):
        self.set_header("Content-Type", "text/html; charset=utf-8")
        self.set_header("Content-Security-Policy", "default-src 'self'; script-src 'unsafe-inline'; "
                                                   "style-src 'unsafe-inline'; connect-src 'self'")
        self.finish(DOCS_PAGE)
