"""Localization benchmarks: dataset readers in their native layouts and the AFLoc-protocol metrics."""
