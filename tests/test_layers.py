"""docs/design.md's module list is the import order of the code.

Every module of the package is listed, and each imports only modules listed
above it (or in its own group: `cowfs/pg/`, `cowfs/cli*.py`), counting the
imports inside functions too. A new module adds its line; an import that
points up the list is a layering change to discuss, not to slip in.
"""

import ast
import os
import re

from helpers import REPO

DESIGN = os.path.join(REPO, "docs", "design.md")


def _listed_groups() -> list[list[str]]:
    """The module list of docs/design.md as groups of module names, top first."""
    with open(DESIGN) as f:
        text = f.read()
    block = text[text.index("## Modules"):].split("```")[1]
    groups = []
    for line in block.splitlines():
        match = re.match(r"cowfs/(\S+)", line.strip())
        if match:
            groups.append(match.group(1))
    return groups


def _modules() -> dict[str, str]:
    """Dotted module name (without 'cowfs.') -> path, for every module of the package."""
    found = {}
    for dirpath, _dirs, files in os.walk(os.path.join(REPO, "cowfs")):
        for name in files:
            if name.endswith(".py") and name != "__init__.py":
                rel = os.path.relpath(os.path.join(dirpath, name), os.path.join(REPO, "cowfs"))
                found[rel[:-3].replace(os.sep, ".")] = os.path.join(dirpath, name)
    return found


def _group_of(module: str, groups: list[str]):
    for index, entry in enumerate(groups):
        if entry == "pg/" and module.startswith("pg."):
            return index
        if entry == "cli*.py" and (module.startswith("cli") or module == "__main__"):
            return index
        if entry == f"{module.replace('.', '/')}.py":
            return index
    return None


def _imports(module: str, path: str, known: dict) -> set:
    package = module.rsplit(".", 1)[0] if "." in module else ""
    out = set()
    with open(path) as f:
        tree = ast.parse(f.read())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level:
            parts = package.split(".") if package else []
            base = parts[:len(parts) - node.level + 1]
            target = ".".join(base + ([node.module] if node.module else []))
            candidates = [target] + [f"{target}.{a.name}".strip(".") for a in node.names]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("cowfs."):
            candidates = [node.module[len("cowfs."):]]
        else:
            continue
        out |= {c for c in candidates if c in known and c != module}
    return out


def test_every_module_is_listed_and_imports_only_from_above():
    groups = _listed_groups()
    known = _modules()
    unlisted = sorted(m for m in known if _group_of(m, groups) is None)
    assert unlisted == [], f"modules missing from the list in docs/design.md: {unlisted}"
    upward = []
    for module, path in sorted(known.items()):
        mine = _group_of(module, groups)
        for dep in sorted(_imports(module, path, known)):
            if _group_of(dep, groups) > mine:
                upward.append(f"{module} imports {dep}, listed below it")
    assert upward == [], "\n".join(upward)
