"""Broker trouble, told once per episode: a transient broker error never floods the log.

aiokafka logs every failed connection attempt, fetch and produce response while a broker is
down, many lines a second, and retries by itself (with ``retry_backoff_ms``); the framework's
own paths retry too (a lost transaction is read again, a failed commit is retried). What a
person needs is different: one line when the trouble starts, one when it ends, a counter, and
an ERROR (and ``ready`` false) when no broker at all has been reachable for longer than
:attr:`Connectivity.unreachable_after`.

- :class:`BrokerEpisodes` is a logging filter on aiokafka's loggers: the first transient broker
  error of an episode passes (reworded to say it is retried), the rest are counted, not logged;
  the episode ends when no error came for ``quiet`` seconds.
- :class:`Connectivity` is checked by the runner's reporter once a second: whether the stage's
  client holds a live connection to any broker.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable

log = logging.getLogger("pipeline.broker")

#: aiokafka's loggers whose transient broker errors are grouped (a filter on a logger does
#: not see what its children log, so each module's logger is named).
KAFKA_LOGGERS = (
    "aiokafka",
    "aiokafka.admin.client",
    "aiokafka.client",
    "aiokafka.cluster",
    "aiokafka.conn",
    "aiokafka.consumer.consumer",
    "aiokafka.consumer.fetcher",
    "aiokafka.consumer.group_coordinator",
    "aiokafka.consumer.subscription_state",
    "aiokafka.producer.producer",
    "aiokafka.producer.sender",
)

_TRANSIENT = re.compile(
    r"Unable connect to|Failed fetch messages|Got error produce response|NodeNotReady|"
    r"Unable to request metadata|Connection .* (lost|closed)|KafkaConnectionError|"
    r"NotLeaderOrFollower|NotLeaderForPartition|LeaderNotAvailable|NotCoordinator|"
    r"CoordinatorNotAvailable|CoordinatorLoadInProgress|RequestTimedOut|StaleMetadata|"
    r"Marking the coordinator dead|coordinator dead|Coordinator .* is dead|Cannot send|"
    r"Error sending|Heartbeat failed|Heartbeat send request failed|Heartbeat session expired|"
    r"Group Coordinator Request failed|Unable to update metadata|NotEnoughReplicas|"
    r"OffsetCommit failed|Error fetching offsets|Unknown error fetching data|"
    r"Commit of offsets .* failed|Failed to send"
)


class BrokerEpisodes(logging.Filter):
    """Groups aiokafka's transient broker errors into episodes: one line each way.

    Args:
        quiet: Seconds without a transient error after which the episode is over.
        clock: Monotonic seconds (a fake one in tests).

    Example:
        >>> episodes = BrokerEpisodes.install()  # doctest: +SKIP
        >>> episodes.errors                      # doctest: +SKIP
        0
    """

    def __init__(self, quiet: float = 5.0, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.quiet = quiet
        self.clock = clock
        self.errors = 0  # transient broker errors seen, in all episodes
        # Until the stages run, a coordinator that is not there yet (a fresh broker creating
        # its offsets topic) is a normal start-up state: said at INFO, not as trouble.
        self.starting = True
        self.episodes = 0
        self._since: float | None = None  # start of the open episode
        self._began_starting = False  # the open episode began before the stages ran
        self._last = 0.0
        self._in_episode = 0

    @classmethod
    def install(cls, quiet: float = 5.0) -> BrokerEpisodes:
        """Attach one filter to every aiokafka logger (and return it)."""
        episodes = cls(quiet)
        for name in KAFKA_LOGGERS:
            logging.getLogger(name).addFilter(episodes)
        return episodes

    def uninstall(self) -> None:
        for name in KAFKA_LOGGERS:
            logging.getLogger(name).removeFilter(self)

    @property
    def open(self) -> bool:
        return self._since is not None

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.CRITICAL:
            return True
        try:
            message = record.getMessage()
        except Exception:  # a malformed record: leave it to the handler
            return True
        if not _TRANSIENT.search(message):
            return True
        now = self.clock()
        self.errors += 1
        self._in_episode += 1
        self._last = now
        if self._since is not None:
            return False  # counted; the episode's first line said it all
        self._since = now
        self.episodes += 1
        self._began_starting = self.starting
        if self.starting:
            record.msg = "waiting for Kafka while starting: %s"
            record.levelno, record.levelname = logging.INFO, "INFO"
        else:
            record.msg = (
                "Kafka broker trouble: %s; retrying with backoff (further broker errors are "
                "counted, not logged, until it is over)"
            )
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        record.args = (message,)
        return record.levelno >= logging.getLogger(record.name).getEffectiveLevel()

    def tick(self) -> None:
        """Close the episode when it has been quiet long enough (called once a second)."""
        if self._since is None or self.clock() - self._last < self.quiet:
            return
        if self._began_starting:  # e.g. a group coordinator not ready yet: usual at start
            log.info(
                "Kafka: %d transient broker errors while starting, retried within %.1fs",
                self._in_episode, self._last - self._since,
            )  # fmt: skip
        else:
            log.warning(
                "Kafka broker trouble over after %.1fs (%d broker errors retried)",
                self._last - self._since, self._in_episode,
            )  # fmt: skip
        self._since, self._in_episode = None, 0


class Connectivity:
    """Whether a stage reaches any broker; says so at ERROR after ``unreachable_after``.

    Args:
        name: The stage, for the log line.
        connected: Whether the stage's client holds a live connection to any broker now.
        unreachable_after: Seconds without any broker before the stage says so (and is not
            ready).
        clock: Monotonic seconds.
    """

    def __init__(
        self,
        name: str,
        connected: Callable[[], bool],
        unreachable_after: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = name
        self._connected = connected
        self.unreachable_after = unreachable_after
        self.clock = clock
        self.reachable = True
        self._lost: float | None = None

    def check(self) -> bool:
        """Look again; returns whether a broker is reachable (as far as the stage knows)."""
        now = self.clock()
        if self._connected():
            if not self.reachable:
                log.warning(
                    "stage %s: a Kafka broker is reachable again after %.0fs",
                    self.name, now - (self._lost or now),
                )  # fmt: skip
            self.reachable, self._lost = True, None
            return True
        if self._lost is None:
            self._lost = now
        if self.reachable and now - self._lost >= self.unreachable_after:
            self.reachable = False
            log.error(
                "stage %s: no Kafka broker reachable for %.0fs; the stage is not ready and "
                "keeps retrying. Check that the brokers run and that the bootstrap address "
                "is right",
                self.name, now - self._lost,
            )  # fmt: skip
        return self.reachable
