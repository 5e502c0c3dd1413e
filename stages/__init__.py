"""Reusable filter stages (validate, enrich, route, window, throttle, I/O), built on ``pipeline``."""
