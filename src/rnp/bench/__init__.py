"""Benchmark building blocks: test subjects (backdoored models) made once and cached."""
