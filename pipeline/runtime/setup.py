"""A stage's setup: what it opens once per worker (a client, a pool), before it consumes.

:func:`enter_setup` enters the stage's ``setup`` context before the worker joins its group. While
it fails, the worker consumes nothing and reports not ready: it retries with backoff (one log
line when the episode starts, then one every ten attempts), so a dependency that is down at
start delays the stage instead of sending its input to the dead-letter topic. Errors that no
retry can fix (a non-retriable :class:`~pipeline.errors.StageError`, a
:class:`~pipeline.errors.ConfigError`, a setup that is not an async context manager) stop the
worker at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from pipeline.errors import ConfigError, DefinitionError, StageError
from pipeline.runtime.stats import StageStats
from pipeline.stage import Stage

log = logging.getLogger("pipeline.runtime.worker")

_FIRST_WAIT = 0.5
_MAX_WAIT = 30.0


async def enter_setup(
    stage: Stage, stack: contextlib.AsyncExitStack, stop: asyncio.Event, stats: StageStats
) -> Any:
    """Enter ``stage.setup`` on ``stack``, retrying until it succeeds or ``stop`` is set.

    Returns:
        What the setup yielded (``None`` without a setup, or when stopped first).

    Raises:
        DefinitionError: ``setup`` does not return an async context manager.
        PipelineError: A non-retriable failure of the setup.
    """
    if stage.setup is None:
        return None
    stats.state = "setup"
    attempt, began = 0, time.monotonic()
    while not stop.is_set():
        attempt += 1
        manager = stage.setup()
        if not hasattr(manager, "__aenter__"):
            raise DefinitionError(
                f"stage '{stage.name}': setup returned {type(manager).__name__}, not an async "
                f"context manager (decorate it with @contextlib.asynccontextmanager)"
            )
        try:
            resource = await stack.enter_async_context(manager)
        except (ConfigError, DefinitionError):
            raise
        except StageError as exc:
            if not exc.retriable:
                raise
            wait = _failed(stage, attempt, exc)
        except Exception as exc:
            wait = _failed(stage, attempt, exc)
        else:
            if attempt > 1:
                log.info(
                    "stage %s: setup succeeded after %d attempts (%.1fs); consuming now",
                    stage.name, attempt, time.monotonic() - began,
                )  # fmt: skip
            return resource
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), wait)
    return None


def _failed(stage: Stage, attempt: int, exc: BaseException) -> float:
    wait = float(min(_MAX_WAIT, _FIRST_WAIT * 2 ** min(attempt - 1, 10)))
    if attempt == 1 or attempt % 10 == 0:
        log.warning(
            "stage %s: setup failed (attempt %d): %s: %s; not consuming, retrying in %.1fs "
            "(backoff up to %.0fs) until it succeeds",
            stage.name, attempt, type(exc).__name__, exc, wait, _MAX_WAIT,
        )  # fmt: skip
    return wait
