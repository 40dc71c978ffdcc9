"""Experiments built from the library: flow comparisons, reports."""
