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
    project root; ``path/to/file.py:pipeline`` works from anywhere (the file's directory is
    made importable).

    Raises:
        ConfigError: A malformed reference, a module that cannot be imported, or an attribute
            that is missing or not a pipeline.
    """
    module_name, sep, attr = ref.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"{ref!r} is not MODULE:PIPELINE (for example examples.orders:pipeline)")
    cwd = str(Path.cwd())
    if module_name.endswith(".py") or "/" in module_name:
        # A file: its directory is importable (its own imports and relative schema paths
        # work from anywhere), and it is imported under its file name.
        path = Path(module_name).expanduser().resolve()
        if not path.is_file():
            raise ConfigError(f"{ref!r}: no such file {path}")
        sys.path.insert(0, str(path.parent))
        module_name = path.stem
    elif cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except PipelineError:
        raise  # a pipeline that fails to build explains itself
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            raise ConfigError(
                f"cannot import module '{module_name}' (from {ref!r}): {exc}. Modules are "
                f"found from the current directory ({cwd}) and the installed packages: run "
                f"the command from your project's root, or set PYTHONPATH"
            ) from exc
        raise _user_error(module_name, ref, exc) from exc
    except Exception as exc:  # the module's own code failed (setup code, a factory)
        raise _user_error(module_name, ref, exc) from exc
    try:
        obj = getattr(module, attr)
    except AttributeError:
        raise ConfigError(f"module '{module_name}' has no attribute '{attr}'") from None
    if callable(obj) and not isinstance(obj, Pipeline):
        try:
            obj = obj()
        except PipelineError:
            raise
        except Exception as exc:
            raise _user_error(f"{module_name}:{attr}()", ref, exc) from exc
    if not isinstance(obj, Pipeline):
        raise ConfigError(f"{ref} is a {type(obj).__name__}, not a Pipeline")
    return obj


def _user_error(what: str, ref: str, exc: BaseException) -> ConfigError:
    """One paragraph for an exception out of the user's module: what, where (the innermost
    frame of the user's code), and how to see the whole traceback (``--debug``)."""
    where = ""
    tb = exc.__traceback__
    frames = []
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    own = [f for f in frames if "importlib" not in f.f_code.co_filename]
    if own:
        frame = own[-1]
        where = f" at {frame.f_code.co_filename}:{frame.f_lineno}"
    return ConfigError(
        f"loading {ref!r}: {what} raised {type(exc).__name__}: {exc}{where} "
        f"(run with --debug for the traceback)"
    )
