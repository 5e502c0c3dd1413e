"""Kept for old habits: the demo is :mod:`examples.orders.demo` (``make demo``)."""

import sys

from examples.orders.demo import main

if __name__ == "__main__":
    sys.exit(main())
