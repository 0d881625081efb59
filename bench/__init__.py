"""Benchmarks (not tests): one entry point per study, `python -m bench.<study>`."""
