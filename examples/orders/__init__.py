"""The orders example: placed -> validate -> enrich -> price -> fraud -> notify (outbox).

- :mod:`.domain`: the business rules, pure functions;
- :mod:`.pipeline`: the stages and the pipeline (``examples.orders.pipeline:pipeline``);
- :mod:`.workload`: generated orders with duplicates and poison, and their expected fate;
- :mod:`.demo`: runs it all on a real broker, one OS process per stage (``make demo``).
"""
