"""Import rules of the layout: production code does not import the demo, and endpoints never import the app
module that composes them (they reach the state through `deps.py`)."""

from __future__ import annotations

import ast
from pathlib import Path

SERVICES = Path(__file__).resolve().parents[2] / "services"


def imported_modules(path: Path) -> set[str]:
    """Every module the file imports, at the top or inside a function."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(SERVICES.parent).with_suffix("").parts)


def test_production_code_does_not_import_the_demo() -> None:
    # The CLI registers the demo's commands and `selaras demo` builds the demo shop; everything else must run
    # without the demo.
    allowed = {"services.cli.__init__", "services.cli.serve"}
    offenders = {
        module_name(path)
        for path in SERVICES.rglob("*.py")
        if "demo" not in path.relative_to(SERVICES).parts[:1]
        and module_name(path) not in allowed
        and any(name == "services.demo" or name.startswith("services.demo.") for name in imported_modules(path))
    }
    assert offenders == set()


def test_endpoints_and_deps_do_not_import_the_app_module() -> None:
    apps = {module_name(path) for path in SERVICES.rglob("app.py")}
    routes = [p for p in SERVICES.rglob("*.py") if p.stem in ("endpoints", "deps") or p.stem.endswith("_endpoints")]
    assert len(routes) >= 6
    offenders = {module_name(path): sorted(imported_modules(path) & apps) for path in routes}
    assert {module: apps for module, apps in offenders.items() if apps} == {}


# Rooms stay small enough to read in one sitting, with no exceptions: a module that outgrows the cap holds several
# things and is split by responsibility (as the demo's simulator is: visitor model, history, reactions).
MAX_MODULE_LINES = 600


def test_no_module_outgrows_its_room() -> None:
    sizes = {module_name(path): len(path.read_text().splitlines()) for path in SERVICES.rglob("*.py")}
    too_large = {module: lines for module, lines in sizes.items() if lines > MAX_MODULE_LINES}
    assert too_large == {}
