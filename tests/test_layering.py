"""Import rules: relative imports only inside the pack, ComfyUI modules only in nodes/, layers one way."""

from __future__ import annotations

import ast
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
PACK_DIRS = ("models", "inference", "training", "nodes", "client")
COMFY_MODULES = {"comfy", "comfy_api", "comfy_extras", "folder_paths", "server", "execution"}
HEAVY = {"diffusers", "transformers", "segment_anything", "xformers"}
# Which pack layers each layer may import (architecture: training -> inference -> models).
ALLOWED = {
    "models": {"models"},
    "inference": {"inference", "models"},
    "training": {"training", "inference", "models"},
    "nodes": {"nodes", "inference", "models", "training"},
    "client": {"client"},
}


def _pack_files():
    files = [REPO_ROOT / "__init__.py", REPO_ROOT / "cli.py"]
    for d in PACK_DIRS:
        files += sorted((REPO_ROOT / d).rglob("*.py"))
    return files


def _imports(path: Path):
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield 0, alias.name, node
        elif isinstance(node, ast.ImportFrom):
            yield node.level, node.module or "", node


def _layer_of(path: Path) -> str | None:
    rel = path.relative_to(REPO_ROOT).parts
    return rel[0] if len(rel) > 1 else None


def _is_module_level(tree_node, path: Path) -> bool:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return any(tree_node.lineno == n.lineno for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom)))


def test_no_absolute_imports_of_the_pack():
    bad = []
    for f in _pack_files():
        for level, module, node in _imports(f):
            top = module.split(".")[0]
            if level == 0 and top in ("priorface", "nodes", "models", "inference", "training", "client"):
                bad.append(f"{f.relative_to(REPO_ROOT)}:{node.lineno} imports {module}")
    assert not bad, "absolute imports of the pack (use relative imports):\n" + "\n".join(bad)


def test_comfy_modules_only_in_nodes():
    bad = []
    for f in _pack_files():
        if _layer_of(f) == "nodes":
            continue
        for level, module, node in _imports(f):
            if level == 0 and module.split(".")[0] in COMFY_MODULES:
                bad.append(f"{f.relative_to(REPO_ROOT)}:{node.lineno} imports {module}")
    assert not bad, "ComfyUI modules imported outside nodes/:\n" + "\n".join(bad)


def test_layers_import_one_way():
    bad = []
    for f in _pack_files():
        layer = _layer_of(f)
        if layer is None:
            continue
        depth = len(f.relative_to(REPO_ROOT).parts) - 1  # folders between the root and the file
        for level, module, node in _imports(f):
            if level == 0:
                continue
            if level == depth + 1 and module:  # `from ..x import` names a top-level layer
                target = module.split(".")[0]
                if target in ALLOWED and target not in ALLOWED[layer]:
                    bad.append(f"{f.relative_to(REPO_ROOT)}:{node.lineno} ({layer}) imports {target}")
            elif level == depth + 1 and not module:
                bad.append(f"{f.relative_to(REPO_ROOT)}:{node.lineno} imports the pack root")
    assert not bad, "layering violations:\n" + "\n".join(bad)


def test_client_never_imports_torch():
    for f in sorted((REPO_ROOT / "client").rglob("*.py")):
        for _level, module, node in _imports(f):
            assert module.split(".")[0] not in ("torch", "numpy"), f"{f.name}:{node.lineno} imports {module}"


def test_heavy_libraries_are_imported_lazily():
    bad = []
    for f in _pack_files():
        for level, module, node in _imports(f):
            if level == 0 and module.split(".")[0] in HEAVY and _is_module_level(node, f):
                bad.append(f"{f.relative_to(REPO_ROOT)}:{node.lineno} imports {module} at module level")
    assert not bad, "\n".join(bad)
