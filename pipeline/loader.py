"""Find a pipeline object from a ``MODULE:ATTRIBUTE`` reference (as the CLI takes it)."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

from pipeline.dsl import Pipeline
from pipeline.errors import ConfigError, PipelineError


def load_pipeline(ref: str) -> Pipeline:
    """Import ``module.path:name`` and return the :class:`Pipeline` it names.

    The current directory is importable, so ``examples.orders:pipeline`` works from the
    project root.

    Raises:
        ConfigError: A malformed reference, a module that cannot be imported, or an attribute
            that is missing or not a pipeline.
    """
    module_name, sep, attr = ref.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"{ref!r} is not MODULE:PIPELINE (for example examples.orders:pipeline)")
    cwd = str(Path.cwd())
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except PipelineError:
        raise  # a pipeline that fails to build explains itself
    except ImportError as exc:
        raise ConfigError(f"cannot import module '{module_name}' (from {ref!r}): {exc}") from exc
    try:
        obj = getattr(module, attr)
    except AttributeError:
        raise ConfigError(f"module '{module_name}' has no attribute '{attr}'") from None
    if callable(obj) and not isinstance(obj, Pipeline):
        obj = obj()
    if not isinstance(obj, Pipeline):
        raise ConfigError(f"{ref} is a {type(obj).__name__}, not a Pipeline")
    return obj
