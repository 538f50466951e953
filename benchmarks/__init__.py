"""Throughput benchmarks: ``python -m benchmarks.run`` (``make bench``). See ``benchmarks/README.md``."""
