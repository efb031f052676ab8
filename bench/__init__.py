"""Benchmarks (run as scripts: ``python bench/<name>.py --quick``); shared helpers in
:mod:`bench.common`."""
