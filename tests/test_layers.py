"""The rooms are layered: no module imports one from a higher layer (the engine knows nothing of
the controller, the model nothing of the worker, memory nothing of either), so a change in a room
can only break the rooms above it. Read from the source with `ast`: lazy imports inside functions
count too, `TYPE_CHECKING` blocks too."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# lowest first; a module may import from its own layer and the layers below it
LAYERS: list[tuple[str, ...]] = [
    ("memory",),
    ("experts.kernels", "experts.placement"),
    ("experts.model", "experts.wire"),
    ("experts.worker",),
    ("server.config", "server.engine"),
    ("server.control",),
    ("server.metrics", "server.autoscale", "server.api"),
    ("server.app",),
    ("server.cli", "server.bench"),
]


def _layer_of(module: str) -> int | None:
    best: tuple[int, int] | None = None   # (length of the matching prefix, layer)
    for rank, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if module == prefix or module.startswith(prefix + "."):
                if best is None or len(prefix) > best[0]:
                    best = (len(prefix), rank)
    return None if best is None else best[1]


def _modules() -> dict[str, Path]:
    out = {}
    for package in ("memory", "experts", "server"):
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out[name] = path
    return out


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)   # `from server import x`
    return {m for m in found if m.split(".")[0] in ("memory", "experts", "server")}


def test_every_module_has_a_layer() -> None:
    missing = sorted(name for name in _modules() if name not in ("memory", "experts", "server")
                     and _layer_of(name) is None)
    assert not missing, f"modules outside every layer of LAYERS: {missing}"


def test_no_module_imports_a_higher_layer() -> None:
    modules = _modules()
    upward = []
    for name, path in sorted(modules.items()):
        mine = _layer_of(name)
        if mine is None:
            continue
        for imported in sorted(_imports(path)):
            theirs = _layer_of(imported)
            if theirs is not None and theirs > mine and imported in modules:
                upward.append(f"{name} (layer {mine}) imports {imported} (layer {theirs})")
    assert not upward, "imports from a higher layer:\n" + "\n".join(upward)
