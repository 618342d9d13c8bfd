"""Loading a user's Pyncette app from ``package.module:app`` or ``path/to/file.py:app``."""

from __future__ import annotations

import importlib
import importlib.util
import pathlib
import sys
from typing import Any

from pyncette import Pyncette
from pyncette.task import Task

__all__ = ["load_app", "templates"]

FORMS = "'package.module:app' or 'path/to/file.py:app' (the attribute defaults to 'app')"


def load_app(target: str) -> Pyncette:
    """Import and return the ``Pyncette`` app named by ``target``; ``ValueError`` says what is wrong."""
    if not isinstance(target, str) or not target.strip():
        raise ValueError(f"app target must be {FORMS}, got {target!r}")
    location, _, attribute = target.rpartition(":") if ":" in target else (target, "", "app")
    attribute = attribute or "app"
    module = _import(location, target)
    try:
        app: Any = getattr(module, attribute)
    except AttributeError:
        raise ValueError(f"{target!r}: module {module.__name__!r} has no attribute {attribute!r}") from None
    if not isinstance(app, Pyncette):
        raise ValueError(f"{target!r}: {attribute!r} is a {type(app).__name__}, not a Pyncette app")
    return app


def templates(app: Pyncette) -> dict[str, Task]:
    """The app's tasks as defined, by name: a partitioned task once (not its partitions)."""
    defined: dict[str, Task] = {}
    for task in app._tasks:
        owner = getattr(task, "_parent", task)  # a partition's PartitionedTask
        defined.setdefault(owner.name, owner)
    return defined


def _import(location: str, target: str) -> Any:
    if location.endswith(".py") or "/" in location or "\\" in location:
        path = pathlib.Path(location)
        if not path.is_file():
            raise ValueError(f"{target!r}: no such file {location!r}; expected {FORMS}")
        name = f"_pyncette_target_{path.stem}"
        spec = importlib.util.spec_from_file_location(name, path)
        if spec is None or spec.loader is None:
            raise ValueError(f"{target!r}: cannot import {location!r}")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        sys.path.insert(0, str(path.parent.resolve()))
        try:
            spec.loader.exec_module(module)
        finally:
            sys.path.remove(str(path.parent.resolve()))
        return module
    try:
        return importlib.import_module(location)
    except ModuleNotFoundError as error:
        if error.name and location.startswith(error.name):
            raise ValueError(f"{target!r}: no module named {error.name!r}; expected {FORMS}") from None
        raise
