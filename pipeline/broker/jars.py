"""Fetch the Kafka broker's jars once into a cache outside the repository.

First source: Maven (``org.apache.kafka:kafka_2.13`` plus an SLF4J 1.x binding for log4j2).
Second source, when there is no ``mvn``: the official release archive. Jars are never committed.
"""

from __future__ import annotations

import fcntl
import shutil
import subprocess
import tarfile
import tempfile
import urllib.request
from pathlib import Path

from pipeline.errors import JarsUnavailableError

LOG4J_VERSION = "2.24.3"
# Maven 3.8 defaults to an old dependency plugin that lacks what we use; pin a 3.x one.
DEPENDENCY_PLUGIN_VERSION = "3.8.1"
RELEASE_ARCHIVE = "https://archive.apache.org/dist/kafka/{v}/kafka_2.13-{v}.tgz"

_POM = """<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>local.kafka-pipeline</groupId>
  <artifactId>kafka-broker-jars</artifactId>
  <version>1</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency>
      <groupId>org.apache.kafka</groupId><artifactId>kafka_2.13</artifactId>
      <version>{kafka}</version>
    </dependency>
    <dependency>
      <groupId>org.apache.logging.log4j</groupId><artifactId>log4j-slf4j-impl</artifactId>
      <version>{log4j}</version>
    </dependency>
    <dependency>
      <groupId>org.apache.logging.log4j</groupId><artifactId>log4j-core</artifactId>
      <version>{log4j}</version>
    </dependency>
  </dependencies>
  <build><plugins><plugin>
    <groupId>org.apache.maven.plugins</groupId><artifactId>maven-dependency-plugin</artifactId>
    <version>{plugin}</version>
  </plugin></plugins></build>
</project>
"""

_MARKER = ".complete"


def jars_dir(home: Path, version: str) -> Path:
    """Where the jars of Kafka ``version`` live in the cache."""
    return home / "jars" / f"kafka_2.13-{version}"


def ensure_jars(home: Path, version: str, *, mvn: str | None = None) -> Path:
    """Return a directory holding every jar the broker needs, fetching them on first use.

    Args:
        home: The cache directory (for example ``~/.cache/kafka-pipeline``).
        version: The Apache Kafka release.
        mvn: The Maven executable; found on ``PATH`` when not given.

    Raises:
        JarsUnavailableError: Not cached, and neither Maven nor the release archive delivered.
    """
    target = jars_dir(home, version)
    if (target / _MARKER).exists():
        return target
    home.mkdir(parents=True, exist_ok=True)
    # Several test sessions or CLI calls may start at once: one fetches, the others wait.
    with (home / ".jars.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / _MARKER).exists():
            return target
        staging = Path(tempfile.mkdtemp(prefix="jars-", dir=home))
        try:
            mvn = mvn or shutil.which("mvn")
            if mvn:
                _fetch_with_maven(mvn, version, staging)
            else:
                _fetch_release_archive(version, staging)
            (staging / _MARKER).write_text(version)
            target.parent.mkdir(parents=True, exist_ok=True)
            if target.exists():
                shutil.rmtree(target)
            staging.rename(target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target


def _fetch_with_maven(mvn: str, version: str, out: Path) -> None:
    work = out.parent / f"{out.name}.pom"
    work.mkdir()
    try:
        (work / "pom.xml").write_text(
            _POM.format(kafka=version, log4j=LOG4J_VERSION, plugin=DEPENDENCY_PLUGIN_VERSION)
        )
        cmd = [
            mvn,
            "-q",
            "-B",
            "-f",
            str(work / "pom.xml"),
            "dependency:copy-dependencies",
            f"-DoutputDirectory={out}",
            "-DincludeScope=runtime",
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if proc.returncode != 0 or not any(out.glob("kafka_2.13-*.jar")):
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-8:])
        raise JarsUnavailableError(
            f"Maven could not fetch org.apache.kafka:kafka_2.13:{version} from Maven Central "
            f"(exit {proc.returncode}). Check that Maven Central is reachable, or set "
            f"PIPELINE_BOOTSTRAP to an existing cluster. Maven said:\n{tail}"
        )


def _fetch_release_archive(version: str, out: Path) -> None:
    url = RELEASE_ARCHIVE.format(v=version)
    archive = out / "kafka.tgz"
    try:
        with urllib.request.urlopen(url, timeout=60) as resp, archive.open("wb") as f:
            shutil.copyfileobj(resp, f)
        with tarfile.open(archive) as tar:
            for member in tar.getmembers():
                parts = Path(member.name).parts
                if len(parts) == 3 and parts[1] == "libs" and member.name.endswith(".jar"):
                    member.name = parts[2]
                    tar.extract(member, out, filter="data")
    except OSError as exc:
        raise JarsUnavailableError(
            f"No Maven ('mvn' is not on PATH) and no cached broker jars, and the release archive "
            f"{url} could not be fetched ({exc}). Install Maven (e.g. 'apt-get install maven'), "
            f"or set PIPELINE_BOOTSTRAP to an existing Kafka cluster."
        ) from exc
    finally:
        archive.unlink(missing_ok=True)
    if not any(out.glob("kafka_2.13-*.jar")):
        raise JarsUnavailableError(f"The release archive {url} holds no broker jars.")
