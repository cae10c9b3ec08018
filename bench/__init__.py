"""medops benchmarks: every figure a median of interleaved runs against a baseline measured in the same run.

Run ``python -m bench`` (``make bench``); see :mod:`bench.__main__` for the runner and each
section's module for what it measures and against what.
"""
