"""The package's shape: dependencies point one way, heads <- compose <- ui <- valuemix (CLI, pipeline, demo) <- recipes."""

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAYERS = {"heads": 0, "compose": 1, "ui": 2, "valuemix": 3, "recipes": 4}  # folder -> layer
SUBPACKAGES = {"valuemix.heads": "heads", "valuemix.compose": "compose", "valuemix.ui": "ui"}


def folder_of(module: str) -> str | None:
    """The folder (layer) a valuemix module lives in; None for modules outside valuemix."""
    for prefix, folder in SUBPACKAGES.items():
        if module == prefix or module.startswith(prefix + "."):
            return folder
    return "valuemix" if module == "valuemix" or module.startswith("valuemix.") else None


def imports(path: Path):
    """(line, module) of every import in a file, relative ones included as written."""
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            yield from ((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            yield node.lineno, "." * node.level + (node.module or "")


@pytest.mark.parametrize("folder", LAYERS)
def test_imports_are_absolute_and_point_down(folder):
    wrong = []
    for path in sorted((REPO / folder).rglob("*.py")):
        for line, module in imports(path):
            where = f"{path.relative_to(REPO)}:{line} imports {module}"
            if module.startswith("."):
                wrong.append(f"{where} (relative: write `from valuemix.… import …`)")
            elif folder_of(module) and LAYERS[folder_of(module)] > LAYERS[folder]:
                wrong.append(f"{where} (a higher layer)")
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("folder", ["heads", "compose", "ui", "valuemix", "valuemix/demo"])
def test_each_package_says_what_it_holds(folder):
    doc = ast.get_docstring(ast.parse((REPO / folder / "__init__.py").read_text(encoding="utf-8")))
    assert doc and len(doc) > 40, folder
