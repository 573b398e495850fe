"""The modeling code that `save_pretrained` writes next to the weights, so that
`AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)` loads a checkpoint without `import hope`.

transformers' dynamic-module loader copies the module that `config.json`'s `auto_map` names and, recursively, the
files it imports as `from .name import ...` from the same directory: no subpackages, no second package. So the
bundle is every module of `hope` and `hope_kernels` that `hope.modeling_hope` and `hope.configuration_hope`
import (at module level or lazily inside a function, such as the Triton kernels), each written as one flat file
whose imports of the two packages are rewritten to those relative imports. It is generated from the source that is
imported at save time, so it always matches the code that produced the weights.

    hope.modeling_hope             -> modeling_hope.py
    hope.layers.attention          -> layers_attention.py
    hope_kernels.titans            -> hope_kernels_titans.py        (a package's __init__)
    hope_kernels.titans.reference  -> hope_kernels_titans_reference.py
"""
from __future__ import annotations

import ast
import functools
import importlib.util
import os
from pathlib import Path
from typing import Any

PACKAGES = ("hope", "hope_kernels")
ENTRY_MODULES = ("hope.modeling_hope", "hope.configuration_hope")
AUTO_MAP = {
    "AutoConfig": "configuration_hope.HopeConfig",
    "AutoModel": "modeling_hope.HopeModel",
    "AutoModelForCausalLM": "modeling_hope.HopeForCausalLM",
}


class BundleError(RuntimeError):
    """A module of `hope` / `hope_kernels` imports ours in a form the flat bundle cannot rewrite faithfully."""


def flat_name(module: str) -> str:
    """The bundle's file stem of a module: `hope.` dropped, the other dots made underscores."""
    return module.removeprefix("hope.").replace(".", "_")


def _is_ours(module: str) -> bool:
    return module.split(".")[0] in PACKAGES


def _source_path(module: str) -> tuple[Path, bool]:
    """(source file, whether it is a package's __init__) of an importable module."""
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None or not spec.origin.endswith(".py"):
        raise RuntimeError(f"cannot bundle {module}: no Python source file found for it")
    return Path(spec.origin), spec.submodule_search_locations is not None


def _imported_module(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    """The absolute name of the module a `from ... import` statement reads."""
    if node.level == 0:
        return node.module
    package = module if is_package else module.rpartition(".")[0]
    for _ in range(node.level - 1):
        package = package.rpartition(".")[0]
    return f"{package}.{node.module}" if node.module else package


@functools.lru_cache(maxsize=None)
def _rewrite(module: str, path: Path, is_package: bool, stamp: tuple[int, int]) -> tuple[str, frozenset[str]]:
    """The module's source with every import of our packages made a flat relative import, and those modules.
    Cached per file version (`stamp`: mtime and size), so an edited source is read again."""
    source = path.read_text(encoding="utf-8")
    lines = source.splitlines(keepends=True)
    needed, edits = set(), []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import) and any(_is_ours(alias.name) for alias in node.names):
            raise BundleError(f"{module}: `import {node.names[0].name}` binds a package; write "
                                      "`from module import name` so that the bundle can flatten it")
        if not isinstance(node, ast.ImportFrom):
            continue
        target = _imported_module(node, module, is_package)
        if not _is_ours(target):
            continue
        if importlib.util.find_spec(target).submodule_search_locations is not None:
            for alias in node.names:
                if alias.name == "*" or importlib.util.find_spec(f"{target}.{alias.name}") is not None:
                    raise BundleError(f"{module}: `from {target} import {alias.name}` may import a submodule;"
                                      " import names from the module that defines them")
        names = ", ".join(a.name if a.asname is None else f"{a.name} as {a.asname}" for a in node.names)
        needed.add(target)
        edits.append((node.lineno, node.end_lineno, node.col_offset, node.end_col_offset,
                      f"from .{flat_name(target)} import {names}"))
    for start, end, col, end_col, statement in sorted(edits, reverse=True):
        first, last = lines[start - 1], lines[end - 1]
        lines[start - 1 : end] = [first[:col] + statement + last[end_col:]]
    return "".join(lines), frozenset(needed)


def remote_code_files() -> dict[str, str]:
    """{file name: source} of the bundle, from the modules as they are imported now."""
    files, owner, pending, done = {}, {}, list(ENTRY_MODULES), set()
    while pending:
        module = pending.pop()
        if module in done:
            continue
        done.add(module)
        path, is_package = _source_path(module)
        status = path.stat()
        source, needed = _rewrite(module, path, is_package, (status.st_mtime_ns, status.st_size))
        name = flat_name(module) + ".py"
        if name in owner:
            raise RuntimeError(f"cannot bundle {module} and {owner[name]}: both would be written as {name}")
        owner[name] = module
        files[name] = f"# Generated by hope.remote_code from {module}: edit that module, not this file.\n" + source
        pending.extend(needed - done)
    return files


def save_remote_code(save_directory: str | os.PathLike, config: Any) -> list[Path]:
    """Write the bundle into `save_directory` and point `config.auto_map` at it (config.json is written after)."""
    directory = Path(save_directory)
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, source in sorted(remote_code_files().items()):
        path = directory / name
        path.write_text(source, encoding="utf-8")
        written.append(path)
    config.auto_map = dict(AUTO_MAP)
    return written
