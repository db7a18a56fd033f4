"""Benchmarks of bcekit; run each as a module from the repository root: ``python -m benchmarks.accuracy``."""
