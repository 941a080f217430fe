"""Datasets: loaders for ZsRE, CounterFact, the WISE sets and generic JSON(L) of edit requests."""

from lemoe.data.loaders import LOADERS, load_requests, load_spec, parse_data_spec, sample_path

__all__ = ["LOADERS", "load_requests", "load_spec", "parse_data_spec", "sample_path"]
