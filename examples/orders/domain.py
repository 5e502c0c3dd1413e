"""The orders domain: customers, catalogue, validation, pricing, fraud rules, confirmations.

Pure functions on plain dicts (the decoded Avro values), no Kafka: the stages in
:mod:`examples.orders.pipeline` are thin wrappers around them, and the demo's workload runs
them too, to know in advance what the pipeline must do with each order.

Money is integer minor units (cents) of the order's currency; rounding is half-up at the
cent. Thresholds are in the order's currency (the example keeps no exchange rates).

Example:
    >>> order = {"order_id": "o-1", "customer_id": "c-0001", "currency": "eur",
    ...          "ship_to_country": "de", "coupon": None, "channel": "web", "placed_at": 0,
    ...          "items": [{"sku": "SKU-0001", "quantity": 2, "unit_price_cents": 1000}]}
    >>> valid = check_order(order)
    >>> valid["currency"], valid["ship_to_country"]
    ('EUR', 'DE')
    >>> price_order({**valid, "customer": {"tier": "GOLD"}})["total_cents"]
    2142
"""

from __future__ import annotations

import functools
import random
import re
from typing import Any, Final

from pipeline import StageError

Order = dict[str, Any]

CUSTOMER_SEED: Final = 20240601  # the customer table is the same in every process
CUSTOMERS: Final = 1_000
CATALOGUE_SIZE: Final = 200

#: Tax by ship-to country, in basis points (1900 = 19 %). A country not here is not served.
TAX_RATE_BP: Final[dict[str, int]] = {
    "DE": 1900, "FR": 2000, "GB": 2000, "NL": 2100, "ES": 2100, "IT": 2200, "US": 0,
}  # fmt: skip
CURRENCY_OF: Final[dict[str, str]] = {
    "DE": "EUR", "FR": "EUR", "NL": "EUR", "ES": "EUR", "IT": "EUR", "GB": "GBP", "US": "USD",
}  # fmt: skip
CURRENCIES: Final = frozenset(CURRENCY_OF.values())  # the symbols of enum Currency
TIER_DISCOUNT_BP: Final[dict[str, int]] = {"STANDARD": 0, "SILVER": 500, "GOLD": 1000}
COUPON_PERCENT_BP: Final[dict[str, int]] = {"TENOFF": 1000}  # 10 % off
COUPON_FIXED_CENTS: Final[dict[str, int]] = {"SAVE5": 500}  # 5.00 off
COUPONS: Final = frozenset(COUPON_PERCENT_BP) | frozenset(COUPON_FIXED_CENTS)
MAX_LINES: Final = 50
MAX_QUANTITY: Final = 1000

#: Fraud rules: (name, points). An order scoring FLAG_THRESHOLD or more is held for review.
HIGH_VALUE_CENTS: Final = 150_000
VERY_HIGH_VALUE_CENTS: Final = 500_000
BULK_QUANTITY: Final = 10
COUPON_LARGE_ORDER_CENTS: Final = 50_000
FRAUD_POINTS: Final[dict[str, int]] = {
    "high_value": 45,  # total above 1,500.00
    "very_high_value": 25,  # total above 5,000.00 (on top of high_value)
    "foreign_shipping": 35,  # ship-to country is not the customer's country
    "bulk_quantity": 25,  # a line of 10 or more pieces
    "coupon_on_large_order": 10,  # a coupon on an order above 500.00
    "api_channel": 10,  # placed through the public API rather than web or app
}
FLAG_THRESHOLD: Final = 70

_CUSTOMER_ID = re.compile(r"^c-\d{4}$")
_SIGNUP_EPOCH_MS: Final = 1_577_836_800_000  # 2020-01-01T00:00:00Z
_DAY_MS: Final = 86_400_000


class InvalidOrderError(StageError):
    """An order that breaks a business rule; dead-lettered at once (a retry cannot fix it)."""

    retriable = False


# -- reference data ---------------------------------------------------------------------------


@functools.cache
def customers() -> dict[str, dict[str, Any]]:
    """The customer rows (``customer_id`` -> ``com.example.orders.Customer``), from a seed.

    The same 1,000 rows in every process: the demo writes them to the compacted topic the
    enrich stage loads its table from, and computes the expected outcome with them; the unit
    tests put them in a memory table.
    """
    rng = random.Random(CUSTOMER_SEED)
    first = ["Ada", "Alan", "Grace", "Linus", "Edsger", "Barbara", "Donald", "Frances", "Ken"]
    last = ["Lovelace", "Turing", "Hopper", "Torvalds", "Dijkstra", "Liskov", "Knuth", "Allen"]
    countries = list(TAX_RATE_BP)
    table: dict[str, dict[str, Any]] = {}
    for n in range(1, CUSTOMERS + 1):
        given, family = rng.choice(first), rng.choice(last)
        customer_id = f"c-{n:04d}"
        table[customer_id] = {
            "customer_id": customer_id,
            "name": f"{given} {family}",
            "email": f"{given}.{family}.{n}@example.com".lower(),
            "country": rng.choices(countries, weights=[30, 15, 15, 10, 10, 10, 10])[0],
            "tier": rng.choices(["STANDARD", "SILVER", "GOLD"], weights=[70, 20, 10])[0],
            "signup_at": _SIGNUP_EPOCH_MS + rng.randrange(2000) * _DAY_MS,
        }
    return table


@functools.cache
def catalogue() -> dict[str, int]:
    """SKU -> unit price in cents: mostly small items, a few expensive ones."""
    rng = random.Random(CUSTOMER_SEED + 1)
    prices: dict[str, int] = {}
    for n in range(1, CATALOGUE_SIZE + 1):
        band = rng.random()
        if band < 0.80:
            cents = rng.randrange(199, 6_000)
        elif band < 0.98:
            cents = rng.randrange(6_000, 40_000)
        else:
            cents = rng.randrange(40_000, 250_000)
        prices[f"SKU-{n:04d}"] = cents
    return prices


# -- the stages' logic ------------------------------------------------------------------------


def check_order(order: Order) -> Order:
    """Validate an ``OrderPlaced`` and return it as a normalised ``ValidOrder``.

    Raises:
        InvalidOrderError: The first broken rule, naming the field.
    """
    order_id = order["order_id"]
    if not order_id.strip():
        raise InvalidOrderError("order_id is empty")
    if not _CUSTOMER_ID.match(order["customer_id"]):
        raise InvalidOrderError(f"customer_id {order['customer_id']!r} is not like 'c-0042'")
    items = order["items"]
    if not items:
        raise InvalidOrderError(f"order {order_id} has no lines")
    if len(items) > MAX_LINES:
        raise InvalidOrderError(f"order {order_id} has {len(items)} lines (at most {MAX_LINES})")
    for n, item in enumerate(items, 1):
        if not 1 <= item["quantity"] <= MAX_QUANTITY:
            raise InvalidOrderError(
                f"line {n} ({item['sku']}): quantity {item['quantity']} is not 1..{MAX_QUANTITY}"
            )
        if item["unit_price_cents"] <= 0:
            raise InvalidOrderError(
                f"line {n} ({item['sku']}): unit price {item['unit_price_cents']} is not positive"
            )
    currency = order["currency"].strip().upper()
    if currency not in CURRENCIES:
        raise InvalidOrderError(f"currency {order['currency']!r} is not accepted")
    country = order["ship_to_country"].strip().upper()
    if country not in TAX_RATE_BP:
        raise InvalidOrderError(f"ship-to country {order['ship_to_country']!r} is not served")
    coupon = order.get("coupon")
    if coupon is not None:
        coupon = coupon.strip().upper()
        if coupon not in COUPONS:
            raise InvalidOrderError(f"coupon {order['coupon']!r} does not exist")
    return {**order, "currency": currency, "ship_to_country": country, "coupon": coupon}


def price_order(order: Order) -> dict[str, int]:
    """The ``com.example.orders.Price`` of an enriched order.

    The tier discount and a percentage coupon add up; a fixed coupon comes off after them;
    the discount never exceeds the subtotal. Tax is on the discounted amount, at the ship-to
    country's rate.
    """
    subtotal = sum(item["quantity"] * item["unit_price_cents"] for item in order["items"])
    coupon = order.get("coupon")
    percent_bp = TIER_DISCOUNT_BP[order["customer"]["tier"]]
    fixed = 0
    if coupon is not None:
        percent_bp += COUPON_PERCENT_BP.get(coupon, 0)
        fixed = COUPON_FIXED_CENTS.get(coupon, 0)
    discount = min(subtotal, _round_div(subtotal * percent_bp, 10_000) + fixed)
    rate = TAX_RATE_BP[order["ship_to_country"]]
    taxable = subtotal - discount
    tax = _round_div(taxable * rate, 10_000)
    return {
        "subtotal_cents": subtotal,
        "discount_cents": discount,
        "tax_rate_bp": rate,
        "tax_cents": tax,
        "total_cents": taxable + tax,
    }


def score_order(order: Order) -> dict[str, Any]:
    """The ``com.example.orders.FraudScore`` of a priced order: points of the rules it hits."""
    total = order["price"]["total_cents"]
    hits = []
    if total > HIGH_VALUE_CENTS:
        hits.append("high_value")
    if total > VERY_HIGH_VALUE_CENTS:
        hits.append("very_high_value")
    if order["ship_to_country"] != order["customer"]["country"]:
        hits.append("foreign_shipping")
    if any(item["quantity"] >= BULK_QUANTITY for item in order["items"]):
        hits.append("bulk_quantity")
    if order.get("coupon") is not None and total > COUPON_LARGE_ORDER_CENTS:
        hits.append("coupon_on_large_order")
    if order.get("channel") == "api":
        hits.append("api_channel")
    return {"score": min(100, sum(FRAUD_POINTS[h] for h in hits)), "reasons": hits}


def is_flagged(score: dict[str, Any]) -> bool:
    """Whether a fraud score holds the order for review."""
    return bool(score["score"] >= FLAG_THRESHOLD)


def confirmation(order: Order, confirmed_at: int) -> dict[str, Any]:
    """The ``com.example.orders.Confirmation`` of a scored order, for the outbox."""
    customer, price = order["customer"], order["price"]
    lines = sum(item["quantity"] for item in order["items"])
    total = f"{money(price['total_cents'])} {order['currency']}"
    return {
        "order_id": order["order_id"],
        "customer_id": order["customer_id"],
        "email": customer["email"],
        "subject": f"Your order {order['order_id']} is confirmed",
        "body": (
            f"Hello {customer['name']}, thank you for your order of {lines} item(s). "
            f"Total {total}, of which tax {money(price['tax_cents'])}."
        ),
        "currency": order["currency"],
        "total_cents": price["total_cents"],
        "placed_at": order["placed_at"],
        "confirmed_at": confirmed_at,
        "locale": "en",
    }


def money(cents: int) -> str:
    """``123456`` -> ``'1,234.56'``."""
    sign = "-" if cents < 0 else ""
    whole, part = divmod(abs(cents), 100)
    return f"{sign}{whole:,}.{part:02d}"


def _round_div(numerator: int, denominator: int) -> int:
    """Half-up rounding of a non-negative quotient, in integers (no float error)."""
    return (numerator + denominator // 2) // denominator
