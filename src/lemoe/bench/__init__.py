"""Benchmark matrices: ``lemoe bench CONFIG`` (cells of ``lemoe run``) and their aggregate."""

from lemoe.bench.config import Bench, BenchConfigError, Cell, load_bench

__all__ = ["Bench", "BenchConfigError", "Cell", "load_bench"]
