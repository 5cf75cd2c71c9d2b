"""Benchmarks and long-running reliability runs (``make bench``; not part of ``make test``)."""
