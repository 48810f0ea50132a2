"""The package's layers: each subpackage imports only from the layers below it
(and its own), at module level, and no module outgrows a reader."""

import ast
import os

import pytest

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "contrastive_tf")
# Lowest first; `version` stands below everything.
LAYERS = ("version", "runtime", "method", "data", "runs", "serving", "jobs")


def _modules():
    for folder, _, files in os.walk(ROOT):
        for name in sorted(files):
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                yield os.path.relpath(path, ROOT), path


def _layer(relative: str) -> str | None:
    head = relative.split(os.sep)[0].split(".")[0]
    return head if head in LAYERS else None


def _imports(tree):
    """(module imported from contrastive_tf, line, at module level?)."""
    top = {id(node) for node in tree.body}
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "contrastive_tf":
                names = [f"contrastive_tf.{a.name}" for a in node.names]
            else:
                names = [node.module]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        for name in names:
            if name.startswith("contrastive_tf"):
                yield name, node.lineno, id(node) in top


def test_every_module_sits_in_a_layer():
    stray = [rel for rel, _ in _modules() if rel != "__init__.py" and _layer(rel) is None]
    assert not stray, f"modules outside the layers {LAYERS}: {stray}"


@pytest.mark.parametrize("relative, path", list(_modules()), ids=lambda v: str(v))
def test_imports_go_down_the_layers_at_module_level(relative, path):
    if relative == "__init__.py":  # the public API gathers every layer
        return
    tree = ast.parse(open(path).read())
    own = LAYERS.index(_layer(relative))
    for name, line, at_top in _imports(tree):
        assert at_top, f"{relative}:{line} imports {name} inside a function"
        target = _layer(name[len("contrastive_tf."):].replace(".", os.sep) + ".py")
        assert target is not None, f"{relative}:{line} imports {name}, outside the layers"
        assert LAYERS.index(target) <= own, (
            f"{relative}:{line} imports {name}: {target} is above {_layer(relative)}")


@pytest.mark.parametrize("relative, path", list(_modules()), ids=lambda v: str(v))
def test_no_module_over_400_lines(relative, path):
    assert sum(1 for _ in open(path)) <= 400, f"{relative} has grown past 400 lines"


def test_layer_docstrings_say_what_they_own_and_may_import():
    for layer in LAYERS[1:]:
        if layer == "data":
            path = os.path.join(ROOT, "data", "__init__.py")
        else:
            path = os.path.join(ROOT, layer, "__init__.py")
        doc = ast.get_docstring(ast.parse(open(path).read()))
        assert doc and "import" in doc, f"{layer}/__init__.py should say what it may import"
