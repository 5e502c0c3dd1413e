"""Reusable filter stages (validate, enrich, route, window, throttle, I/O) on ``pipeline``."""
