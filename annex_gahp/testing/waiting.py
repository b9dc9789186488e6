"""Polling until something holds, with a message that says what was awaited."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_for(
    condition: Callable[[], T],
    timeout: float = 60,
    interval: float = 0.5,
    what: str = "condition",
    on_timeout: Callable[[], str] | None = None,
) -> T:
    """Call `condition` until it returns something truthy (returned) or `timeout` seconds pass
    (AssertionError naming `what`, plus `on_timeout()`'s text, e.g. a log tail)."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while True:
        try:
            value = condition()
            if value:
                return value
        except AssertionError:
            raise
        except Exception as e:
            last_error = e
        if time.monotonic() >= deadline:
            detail = f" (last error: {last_error!r})" if last_error else ""
            extra = ""
            if on_timeout is not None:
                try:
                    extra = "\n" + on_timeout()
                except Exception as e:
                    extra = f"\n(on_timeout failed: {e!r})"
            raise AssertionError(f"timed out after {timeout}s waiting for {what}{detail}{extra}")
        time.sleep(interval)
