"""The README's TestDriver example, verbatim: the README cannot drift from the code."""

from pipeline import Pipeline, SchemaStore, stage
from pipeline.testing import TestDriver

store = SchemaStore()
store.add(
    {
        "type": "record",
        "name": "com.example.Order",
        "fields": [{"name": "order_id", "type": "string"}, {"name": "total", "type": "double"}],
    }
)


@stage(input="com.example.Order", output="com.example.Order")
def add_tax(order: dict) -> dict:
    return {**order, "total": round(order["total"] * 1.2, 2)}


def test_add_tax() -> None:
    driver = TestDriver(Pipeline("p", source="p.in", key="order_id", schemas=store) | add_tax)
    driver.send({"order_id": "o-1", "total": 10.0}, seq=1)
    driver.send({"order_id": "o-1", "total": 10.0}, seq=1)  # a retransmission: dropped
    driver.send({"order_id": "o-1", "total": 20.0}, seq=2)
    driver.send_raw(b"o-2", b"not avro")  # poison
    stats = driver.run()
    assert driver.outputs() == [
        {"order_id": "o-1", "total": 12.0},
        {"order_id": "o-1", "total": 24.0},
    ]
    assert stats["add_tax"].duplicates == 1
    assert driver.dead_letters()[0].error_class == "DecodeError"
