"""Benchmarks whose numbers the README quotes; each is run as ``python benchmarks/<name>.py``."""
