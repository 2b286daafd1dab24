"""Benchmark harness and report: every algorithm over the same throttled links, side by side."""
