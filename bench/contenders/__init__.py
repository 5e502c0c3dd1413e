"""The contenders: the framework's stage worker and the baselines it is measured against.

In-process contenders (``stage``, ``aiokafka_avro``, ``aiokafka_raw``) are coroutines that
return a :class:`~bench.common.RunResult`; faust and Quix Streams run in subprocesses
(:mod:`bench.contenders.external`) because each owns its event loop, signals and logging.
"""
