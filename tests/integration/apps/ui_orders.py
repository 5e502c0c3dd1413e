"""The orders pipeline (tracking jobs) under a name of the test's, for the dashboard's tests.
Run by ``pipeline run`` and ``pipeline ui`` in child processes.

Environment (read here, by the test app): ``UI_ORDERS`` (the pipeline name);
``UI_ORDERS_FIXED=1``: the "bug" is fixed: ``validate`` accepts the new coupon ``SPRING``
(which marketing launched before the validation rules knew it), so the orders dead-lettered
for it pass once replayed.
"""

from __future__ import annotations

import os

from examples.orders import domain
from examples.orders.pipeline import ORDER_PLACED, VALID_ORDER, Order, build
from pipeline import Pipeline, stage

NEW_COUPON = "SPRING"


@stage(input=ORDER_PLACED, output=VALID_ORDER)
def validate(order: Order) -> Order:
    """:func:`examples.orders.pipeline.validate`, and with the fix, coupon SPRING too (no
    discount: the pricing rules ignore a coupon they do not know)."""
    coupon = (order.get("coupon") or "").strip().upper()
    if coupon == NEW_COUPON and os.environ.get("UI_ORDERS_FIXED") == "1":
        return {**domain.check_order({**order, "coupon": None}), "coupon": NEW_COUPON}
    return domain.check_order(order)


def orders(name: str) -> Pipeline:
    """The orders pipeline named ``name``, with this module's ``validate``, tracking jobs."""
    return build(name, check=validate).with_jobs()


pipeline = orders(os.environ.get("UI_ORDERS", "uiorders"))
