"""Real headless Chromium (Debian's ``chromium`` and ``chromium-driver``, which ``make test``
installs) driven by Selenium, and ``pipeline ui`` as a child process, for the dashboard tests."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import pytest

from tests.integration.helpers import ROOT

CHROMIUM = Path(os.environ.get("PIPELINE_CHROMIUM", "/usr/bin/chromium"))
CHROMEDRIVER = Path(os.environ.get("PIPELINE_CHROMEDRIVER", "/usr/bin/chromedriver"))
#: Screenshots of the dashboard's pages, kept after the run (a CI's test artifacts).
ARTIFACTS = Path(os.environ.get("PIPELINE_TEST_ARTIFACTS", ROOT / ".artifacts")) / "ui"

T = TypeVar("T")


@contextmanager
def chromium(profile: Path) -> Iterator[Any]:
    """A headless Chromium session (Selenium's ``WebDriver``) with its own empty profile."""
    if not CHROMIUM.exists() or not CHROMEDRIVER.exists():
        pytest.fail(
            f"no {CHROMIUM} or {CHROMEDRIVER}: the dashboard's browser tests need Debian's "
            "chromium and chromium-driver ('make browser' installs them; 'make test' does too)"
        )
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in (
        "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
        "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--window-size=1400,1000",
        f"--user-data-dir={profile}",
    ):  # fmt: skip
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        yield driver
    except BaseException:
        with contextlib.suppress(Exception):  # what the page showed when the test failed
            screenshot(driver, f"failure-{profile.parent.name}")
        raise
    finally:
        driver.quit()


def wait_until(what: str, check: Callable[[], T | None], within: float = 30.0) -> T:
    """``check()``'s first truthy value, asked every 0.2 s; fails naming ``what``."""
    deadline = time.monotonic() + within
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except AssertionError:
            raise
        except Exception as exc:  # the page is between two renders: ask again
            last = exc
        else:
            if last:
                return last
        time.sleep(0.2)
    raise AssertionError(f"not within {within:.0f} s: {what} (last: {last!r})")


def screenshot(driver: Any, name: str) -> Path:
    """Write the page as ``ARTIFACTS/NAME.png`` (the whole page height)."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(1400, max(900, min(int(height) + 40, 4000)))
    path = ARTIFACTS / f"{name}.png"
    driver.save_screenshot(str(path))
    return path


class Dashboard:
    """``pipeline ui REF... --port 0`` as a child process; ``url`` carries the token."""

    def __init__(self, refs: list[str], bootstrap: str, env: dict[str, str], log: Path) -> None:
        self.log = log
        self._file = log.open("wb")
        cmd = [sys.executable, "-m", "pipeline.cli", "ui", *refs, "--bootstrap", bootstrap,
               "--port", "0"]  # fmt: skip
        full = {**os.environ, **env, "PYTHONUNBUFFERED": "1", "COLUMNS": "300"}
        self.proc = subprocess.Popen(
            cmd, cwd=ROOT, env=full, stdout=self._file, stderr=subprocess.STDOUT
        )
        self.url = wait_until("the dashboard prints its address", self._url, within=60)
        self.base = self.url.split("/?", 1)[0]
        self.token = self.url.rsplit("token=", 1)[1]

    def _url(self) -> str | None:
        if self.proc.poll() is not None:
            raise AssertionError(f"pipeline ui exited: {self.log.read_text(errors='replace')}")
        for line in self.log.read_text(errors="replace").splitlines():
            if line.startswith("url: "):
                return line[5:].strip()
        return None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self._file.close()
