"""The house as built (docs/internals.rst): packages import only downwards, and no module
imports itself back through others."""
import ast
import os

PACKAGE = os.path.join(os.path.dirname(__file__), "..", "comfy_ws_proxy")

# What each part may import of the package (besides itself). The faces use the jobs; the
# jobs use the backends and the store; the shared vocabulary is below everything.
BASE = {"model", "metrics", "wsframes", "config", "logs", "auth"}
ALLOWED = {
    "model": set(),
    "wsframes": set(),
    "metrics": set(),
    "logs": set(),
    "config": set(),
    "auth": set(),
    "store": {"model"},
    "backends": {"model", "metrics", "wsframes"},
    "jobs": {"model", "metrics", "backends", "store"},
    "gateway": BASE | {"jobs"},
    "api": BASE | {"jobs", "backends"},
    "client": {"gateway", "model"},
    "app": BASE | {"store", "backends", "jobs", "gateway", "api", "__init__"},
    "server": {"config", "metrics"},
    "__main__": BASE | {"app", "store", "server"},
    "testing": set(),
    "__init__": set(),
}


def modules():
    for root, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(root, name)
                rel = os.path.relpath(path, PACKAGE)[:-3].replace(os.sep, ".")
                yield rel, path


def imports_of(rel: str, path: str) -> set[str]:
    """Package modules imported at run time (not under TYPE_CHECKING), as dotted names."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read())
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.dump(node.test):
            skip.update(id(child) for child in ast.walk(node))
    package = rel.split(".")[:-1]
    found = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - (node.level - 1)] if node.level > 1 else package
                target = ".".join(base + ([node.module] if node.module else []))
                names = [target + "." + a.name if not node.module else target for a in node.names]
                found.update(n.strip(".") for n in names)
            elif node.module and node.module.startswith("comfy_ws_proxy"):
                found.add(node.module[len("comfy_ws_proxy"):].strip("."))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("comfy_ws_proxy."):
                    found.add(alias.name[len("comfy_ws_proxy."):])
    return {f for f in found if f}


def top(name: str) -> str:
    return name.split(".")[0]


def test_packages_import_only_downwards():
    wrong = []
    parts = {top(rel) for rel, _ in modules()}
    for rel, path in modules():
        part = top(rel)
        for target in imports_of(rel, path):
            other = top(target) if top(target) in parts else "__init__"  # (from . import __version__)
            if other != part and other not in ALLOWED[part]:
                wrong.append(f"{rel} imports {target}")
    assert wrong == []


def test_no_import_cycles():
    known = {rel for rel, _ in modules()}

    def resolve(name: str) -> str | None:
        while name and name not in known and name + ".__init__" not in known:
            name = name.rpartition(".")[0]
        if not name:
            return None
        return name if name in known else name + ".__init__"

    graph = {rel: {r for r in (resolve(t) for t in imports_of(rel, path)) if r and r != rel}
             for rel, path in modules()}
    state: dict[str, int] = {}
    cycles = []

    def visit(node, trail):
        state[node] = 1
        for nxt in graph[node]:
            if state.get(nxt) == 1:
                cycles.append(trail[trail.index(nxt):] + [nxt] if nxt in trail else [node, nxt])
            elif nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = 2

    for node in graph:
        if node not in state:
            visit(node, [node])
    assert cycles == []
