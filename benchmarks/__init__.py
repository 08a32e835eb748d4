"""Side-by-side benchmark scripts (``python -m benchmarks.<name>``); no timed tests."""
