"""Generated orders for the demo, with faults injected, and what the pipeline must make of them.

Each published record is one of:

- a new order (most of them), some of which break a business rule or name a customer who is
  not in the table;
- a retransmission: an order published before, sent again with the same sequence number and
  event id (what a client does when it times out waiting for an acknowledgement);
- poison: bytes that are not an ``OrderPlaced`` at all (truncated, garbage, JSON, a foreign
  schema fingerprint), as a misbehaving producer writes them.

:class:`Expected` counts what the pipeline must do with them, computed with the same domain
functions the stages call; the demo compares it with what the stages report.

Example:
    >>> from pipeline import SchemaStore
    >>> from examples.orders.pipeline import ORDER_PLACED, SCHEMAS
    >>> codec = SchemaStore.from_directory(SCHEMAS).codec(ORDER_PLACED)
    >>> work = Workload(1000, codec, seed=7)
    >>> sum(1 for _ in work.events()) == work.expected.published == 1000
    True
"""

from __future__ import annotations

import json
import random
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from examples.orders import domain
from pipeline import Codec

_RECENT = 2000  # retransmissions repeat one of the last this many orders
_COUNTRIES = list(domain.TAX_RATE_BP)


@dataclass(frozen=True, slots=True)
class Faults:
    """Shares of the published records that are faulty (each between 0 and 1).

    Example:
        >>> Faults(duplicates=0.0).invalid
        0.005
    """

    duplicates: float = 0.02  # retransmissions of an order already sent
    undecodable: float = 0.005  # bytes that are not an OrderPlaced
    invalid: float = 0.005  # orders that break a business rule
    unknown_customer: float = 0.002  # orders of customers not in the table


@dataclass(slots=True)
class Expected:
    """What the pipeline must do with the published records."""

    published: int = 0  # records written to the source topic, of every kind
    orders: int = 0  # distinct orders (not counting retransmissions)
    duplicates: int = 0
    undecodable: int = 0
    invalid: int = 0
    unknown_customer: int = 0
    flagged: int = 0  # fraud score at or above the threshold
    confirmed: int = 0  # confirmations that must reach the outbox


@dataclass(frozen=True, slots=True)
class Event:
    """One record to publish: an order value (with its ids) or raw poison bytes."""

    key: bytes
    value: dict[str, Any] | None
    raw: bytes | None
    seq: int
    event_id: bytes


class Workload:
    """``count`` records to publish, built lazily (:meth:`events`) from ``seed``.

    Args:
        count: Records in all (orders, retransmissions and poison).
        codec: The ``OrderPlaced`` codec (poison is made from real encodings).
        seed: Makes the workload repeatable (order ids still differ per run: ``run_id``).
        faults: Shares of faulty records.
        run_id: Prefix of the order ids; a random one by default, so that a second run on
            the same broker does not collide with the first in the dedup tables.
    """

    def __init__(
        self,
        count: int,
        codec: Codec,
        *,
        seed: int = 1,
        faults: Faults = Faults(),
        run_id: str | None = None,
    ) -> None:
        self.count = count
        self.codec = codec
        self.faults = faults
        self.run_id = run_id or uuid.uuid4().hex[:6]
        self.expected = Expected()
        self._rng = random.Random(seed)
        self._customers = list(domain.customers().values())
        self._skus = list(domain.catalogue().items())

    def events(self) -> Iterator[Event]:
        """Yield the records in publishing order, counting their expected fate as it goes."""
        rng, faults, expected = self._rng, self.faults, self.expected
        recent: list[Event] = []
        dup_until = faults.duplicates
        poison_until = dup_until + faults.undecodable
        for n in range(self.count):
            draw = rng.random()
            expected.published += 1
            if draw < dup_until and recent:
                expected.duplicates += 1
                yield rng.choice(recent)
                continue
            if draw < poison_until:
                expected.undecodable += 1
                yield self._poison(n)
                continue
            order = self._order_value(n)
            expected.orders += 1
            self._expect(order)
            # An order's "placed" event is its first: sequence number 1 of its key.
            event = Event(order["order_id"].encode(), order, None, 1, uuid.uuid4().bytes)
            if len(recent) < _RECENT:
                recent.append(event)
            else:
                recent[n % _RECENT] = event
            yield event

    # -- orders ---------------------------------------------------------------------------

    def _order_value(self, n: int) -> dict[str, Any]:
        rng, faults = self._rng, self.faults
        customer = rng.choice(self._customers)
        country = customer["country"] if rng.random() > 0.05 else rng.choice(_COUNTRIES)
        currency = domain.CURRENCY_OF[country]
        order: dict[str, Any] = {
            "order_id": f"o-{self.run_id}-{n:07d}",
            "customer_id": customer["customer_id"],
            "items": self._lines(),
            # Clients are sloppy about case; validate normalises.
            "currency": currency if rng.random() > 0.02 else currency.lower(),
            "ship_to_country": country if rng.random() > 0.02 else country.lower(),
            "coupon": self._coupon(),
            "channel": rng.choices(["web", "app", "api"], weights=[80, 15, 5])[0],
            "placed_at": time.time_ns() // 1_000_000,
        }
        draw = rng.random()
        if draw < faults.invalid:
            self._break(order)
        elif draw < faults.invalid + faults.unknown_customer:
            order["customer_id"] = f"c-{rng.randrange(domain.CUSTOMERS + 1, 10_000):04d}"
        return order

    def _lines(self) -> list[dict[str, Any]]:
        rng = self._rng
        lines = []
        for _ in range(rng.choices([1, 2, 3, 4, 5], weights=[35, 30, 20, 10, 5])[0]):
            sku, cents = rng.choice(self._skus)
            bucket = rng.random()
            if bucket < 0.70:
                quantity = 1
            elif bucket < 0.95:
                quantity = rng.randint(2, 3)
            elif bucket < 0.99:
                quantity = rng.randint(4, 9)
            else:
                quantity = rng.randint(10, 30)
            lines.append({"sku": sku, "quantity": quantity, "unit_price_cents": cents})
        return lines

    def _coupon(self) -> str | None:
        draw = self._rng.random()
        if draw < 0.05:
            return "TENOFF"
        if draw < 0.08:
            return "save5"
        return None

    def _break(self, order: dict[str, Any]) -> None:
        """Make ``order`` break one business rule (still a well-formed OrderPlaced)."""
        rule = self._rng.randrange(6)
        if rule == 0:
            order["items"] = []
        elif rule == 1:
            order["items"][0]["quantity"] = 0
        elif rule == 2:
            order["items"][0]["unit_price_cents"] = -order["items"][0]["unit_price_cents"]
        elif rule == 3:
            order["currency"] = "XBT"
        elif rule == 4:
            order["ship_to_country"] = "ZZ"
        else:
            order["coupon"] = "FREESTUFF"

    def _expect(self, order: dict[str, Any]) -> None:
        """Count what the stages will make of ``order``, with the functions they call."""
        expected = self.expected
        try:
            valid = domain.check_order(order)
        except domain.InvalidOrderError:
            expected.invalid += 1
            return
        customer = domain.customers().get(valid["customer_id"])
        if customer is None:
            expected.unknown_customer += 1
            return
        enriched = {**valid, "customer": customer}
        priced = {**enriched, "price": domain.price_order(enriched)}
        if domain.is_flagged(domain.score_order(priced)):
            expected.flagged += 1
        else:
            expected.confirmed += 1

    # -- poison ---------------------------------------------------------------------------

    def _poison(self, n: int) -> Event:
        rng = self._rng
        order_id = f"o-{self.run_id}-{n:07d}"
        kind = rng.randrange(4)
        if kind == 0:  # cut off in the middle: a producer that died mid-write
            good = self.codec.encode(self._order_value(n))
            raw = good[: rng.randrange(11, len(good) - 1)]
        elif kind == 1:  # JSON from a producer that never heard of Avro
            raw = json.dumps({"order_id": order_id, "total": 12.5}).encode()
        elif kind == 2:  # Avro single-object header with a fingerprint nobody knows
            raw = b"\xc3\x01" + rng.randbytes(8) + rng.randbytes(40)
        else:  # garbage
            raw = rng.randbytes(rng.randrange(1, 64))
        return Event(order_id.encode(), None, raw, 0, b"")
