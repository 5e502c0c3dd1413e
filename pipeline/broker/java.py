"""Find a Java runtime that can run the Kafka 4 broker (17 or newer)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

from pipeline.errors import JavaNotFoundError

MIN_JAVA = 17


def find_java(java_home: Path | None = None) -> tuple[Path, int]:
    """Find a Java runtime of version 17 or newer.

    Args:
        java_home: A JDK/JRE home to use; ``java`` on ``PATH`` when not given.

    Returns:
        The ``java`` executable and its major version.

    Raises:
        JavaNotFoundError: No ``java``, or one older than 17.
    """
    if java_home is not None:
        java = java_home / "bin" / "java"
        where = f"{java} (from JAVA_HOME)"
        if not java.exists():
            raise JavaNotFoundError(
                f"No Java runtime at {java}: JAVA_HOME points to {java_home}, which holds no "
                f"bin/java. Point JAVA_HOME at a JDK {MIN_JAVA}+ or unset it to use 'java' on PATH."
            )
    else:
        found = shutil.which("java")
        if found is None:
            raise JavaNotFoundError(
                f"No Java runtime found: 'java' is not on PATH and JAVA_HOME is not set. The local "
                f"Kafka broker needs Java {MIN_JAVA} or newer (e.g. 'apt-get install "
                f"openjdk-17-jre-headless'), or set PIPELINE_BOOTSTRAP to an existing cluster."
            )
        java, where = Path(found), found
    try:
        out = subprocess.run(
            [str(java), "-version"], capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise JavaNotFoundError(f"Could not run {where}: {exc}.") from exc
    major = parse_java_major(out.stderr + out.stdout)
    if major is None:
        raise JavaNotFoundError(f"Could not read the Java version from {where} -version.")
    if major < MIN_JAVA:
        raise JavaNotFoundError(
            f"Java {major} at {where} is too old: Apache Kafka 4 needs Java {MIN_JAVA} or newer. "
            f"Install a newer JDK and point JAVA_HOME at it."
        )
    return java, major


def parse_java_major(version_output: str) -> int | None:
    """Read the major version from ``java -version`` output ('1.8.0_392' -> 8, '17.0.15' -> 17)."""
    m = re.search(r'version "(\d+)(?:\.(\d+))?', version_output)
    if not m:
        return None
    major = int(m.group(1))
    return int(m.group(2) or 0) if major == 1 else major
