"""The import direction of the layers (README, ARCHITECTURE):

    tools/ -> services (retrieval/, ranking/, gateway/) and offline/ -> common/ -> core/

Every .py file's imports are read with `ast` (nothing is imported), lazy imports inside functions
included. tests/ are exempt and tools/ may import anything.
"""
from __future__ import annotations

import ast
import fnmatch
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SERVICES = ("retrieval", "ranking", "gateway")
# Packages whose imports are checked -> (forbidden module patterns, why). A pattern matches a
# module and its submodules; `*` is a wildcard within the top-level name (grpc_* = grpc_health, ...).
RULES: dict[str, tuple[tuple[str, ...], str]] = {
    "core": (("protos", "google.protobuf", "grpc", "grpc_*", "tritonclient", "prometheus_client",
              "common", "offline", "tools", *SERVICES),
             "core is the proto-free domain: no protobuf, gRPC, Triton, metrics or any other layer"),
    "common": (("offline", "tools", *SERVICES), "common sits below services and offline"),
    **{service: (("offline", "tools", *(s for s in SERVICES if s != service)),
                 "a service imports neither offline, tools nor another service") for service in SERVICES},
    "offline": (("tools", *SERVICES), "offline never imports a service or tools"),
}
# Top-level folders with Python that no rule constrains, and why.
UNCONSTRAINED = {
    "tools": "sits on top: may import anything",
    "tests": "exempt",
    "protos": "generated protobuf code",
    "model_repository": "Triton python models: run inside Triton, import no project package",
    "deploy": "container health checks",
}


def imported_modules(tree: ast.AST, package_parts: tuple[str, ...]) -> list[str]:
    """Absolute dotted names a module imports; package_parts = the folder of the file, from the
    repository root (relative imports are resolved against it)."""
    out: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                out.append(node.module or "")
                continue
            base = list(package_parts[:max(0, len(package_parts) - (node.level - 1))])
            if node.module:
                out.append(".".join([*base, node.module]))
            else:   # from . import x: x may be a module
                out += [".".join([*base, alias.name]) for alias in node.names]
    return [m for m in out if m]


def matches(module: str, pattern: str) -> bool:
    parts, want = module.split("."), pattern.split(".")
    return len(parts) >= len(want) and all(fnmatch.fnmatchcase(p, w) for p, w in zip(parts, want))


def violations_in(source: str, path: str) -> list[str]:
    """'path: imports X (why)' for each forbidden import in one file (path relative to the repo)."""
    parts = tuple(Path(path).parts)
    rule = RULES.get(parts[0]) if len(parts) > 1 else None
    if rule is None:
        return []
    forbidden, why = rule
    found = []
    for module in imported_modules(ast.parse(source, filename=path), parts[:-1]):
        if any(matches(module, pattern) for pattern in forbidden):
            found.append(f"{path}: imports {module} ({why})")
    return sorted(set(found))


def checked_files() -> list[Path]:
    return sorted(p for package in RULES for p in (REPO / package).rglob("*.py") if "__pycache__" not in p.parts)


def test_imports_follow_the_layers():
    files = checked_files()
    assert len(files) > 20, "the layer packages were not found"
    violations = [v for p in files for v in violations_in(p.read_text(), p.relative_to(REPO).as_posix())]
    assert not violations, "imports against the layering:\n" + "\n".join(violations)


def test_every_python_folder_has_a_rule():
    # A new top-level package must be placed in the layering (RULES) or named in UNCONSTRAINED.
    folders = {d.name for d in REPO.iterdir() if d.is_dir() and not d.name.startswith(".")
               and next(d.rglob("*.py"), None) is not None}
    unplaced = folders - set(RULES) - set(UNCONSTRAINED)
    assert not unplaced, f"top-level folders outside the layering: {sorted(unplaced)}"


def test_the_detector_flags_violations():
    # The rules can fail: each of these is one violation, named with its module.
    cases = {
        ("core/x.py", "import grpc"): "grpc",
        ("core/x.py", "from grpc_health.v1 import health"): "grpc_health.v1",
        ("core/x.py", "from google.protobuf import message"): "google.protobuf",
        ("core/x.py", "def f():\n    from protos import fusionrec_pb2\n"): "protos",   # lazy import
        ("core/sub/x.py", "from ...common import artifacts"): "common",
        ("common/x.py", "from offline.build import build"): "offline.build",
        ("ranking/x.py", "from retrieval.server import validate"): "retrieval.server",
        ("retrieval/x.py", "from .. import gateway"): "gateway",
        ("gateway/x.py", "import tools.cli"): "tools.cli",
        ("offline/x.py", "from ranking.ranker import Ranker"): "ranking.ranker",
        ("offline/datasets/x.py", "import tools"): "tools",
    }
    for (path, source), module in cases.items():
        found = violations_in(source, path)
        assert len(found) == 1 and f"{path}: imports {module} (" in found[0], (path, source, found)


def test_the_detector_allows_the_layering():
    allowed = {
        "core/x.py": "import numpy, faiss\nfrom core.types import RetrievalQuery\nfrom . import limits",
        "common/x.py": "import grpc\nfrom core.limits import MAX_K\nfrom protos import fusionrec_pb2",
        "retrieval/x.py": "from common.wire import check_indices\nfrom retrieval import server",
        "offline/datasets/x.py": "from common.artifacts import publish\nfrom .. import build\nfrom offline import cf",
        "tools/x.py": "from offline.build import build\nfrom gateway import server\nimport ranking",
        "tests/unit/x.py": "from offline.build import build\nimport retrieval",
        "setup.py": "import gateway",
    }
    for path, source in allowed.items():
        assert violations_in(source, path) == [], path
