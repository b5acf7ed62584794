"""Reading an installed engine's source without importing it (its import pulls a GPU stack).

``importlib.util.find_spec(name)`` for a top-level package locates it without executing its
``__init__``; the files are then parsed with ``ast``.
"""
from __future__ import annotations

import ast
import importlib.metadata
import importlib.util
from pathlib import Path

import pytest


def package_root(name: str) -> Path | None:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def require(name: str, pinned: str) -> Path:
    """The package's root, skipping the calling module when the package is absent and failing
    when another version is installed (the plugin is pinned)."""
    root = package_root(name)
    if root is None:
        pytest.skip(f"{name} is not installed (CI installs it with .ci/engines.sh)",
                    allow_module_level=True)
    version = importlib.metadata.version(name)
    assert version.split("+")[0] == pinned, \
        f"{name} {version} is installed; the HISA plugin is pinned to {pinned}"
    return root


class Source:
    def __init__(self, root: Path, rel: str):
        self.path = root / rel
        assert self.path.is_file(), f"{rel} is gone from the installed package"
        self.text = self.path.read_text()
        self.tree = ast.parse(self.text)

    def node(self, name: str, kind=(ast.FunctionDef, ast.ClassDef), scope=None):
        body = (scope or self.tree).body
        for n in body:
            if isinstance(n, kind) and n.name == name:
                return n
        raise AssertionError(f"{self.path.name}: no {name}")

    def function(self, name: str) -> ast.FunctionDef:
        return self.node(name, ast.FunctionDef)

    def klass(self, name: str) -> ast.ClassDef:
        return self.node(name, ast.ClassDef)

    def method(self, cls: str, name: str) -> ast.FunctionDef:
        return self.node(name, ast.FunctionDef, scope=self.klass(cls))

    def assigned(self, name: str):
        """The value node of a module-level ``name = ...``."""
        for n in self.tree.body:
            if isinstance(n, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name
                                                 for t in n.targets):
                return n.value
        raise AssertionError(f"{self.path.name}: no module-level {name}")

    def has(self, snippet: str) -> bool:
        return " ".join(snippet.split()) in " ".join(self.text.split())


def params(fn: ast.FunctionDef) -> list[str]:
    a = fn.args
    return [p.arg for p in a.posonlyargs + a.args + a.kwonlyargs]


def defaults(fn: ast.FunctionDef) -> dict:
    a = fn.args
    pos = a.posonlyargs + a.args
    out = {p.arg: ast.literal_eval(d) for p, d in zip(pos[len(pos) - len(a.defaults):],
                                                      a.defaults)}
    out.update({p.arg: ast.literal_eval(d) for p, d in zip(a.kwonlyargs, a.kw_defaults)
                if d is not None})
    return out


def fields(cls: ast.ClassDef) -> list[str]:
    return [n.target.id for n in cls.body if isinstance(n, ast.AnnAssign)
            and isinstance(n.target, ast.Name)]


def self_attrs(fn: ast.FunctionDef) -> set[str]:
    out = set()
    for n in ast.walk(fn):
        if isinstance(n, (ast.Assign, ast.AnnAssign)):
            targets = n.targets if isinstance(n, ast.Assign) else [n.target]
            for t in targets:
                if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) \
                        and t.value.id == "self":
                    out.add(t.attr)
    return out


def decorators(node) -> list[str]:
    return [ast.unparse(d) for d in node.decorator_list]


def calls(node, name: str) -> list[ast.Call]:
    return [n for n in ast.walk(node) if isinstance(n, ast.Call)
            and ast.unparse(n.func).split(".")[-1] == name]
