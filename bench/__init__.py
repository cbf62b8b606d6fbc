"""Benchmarks of chatq against peers measured in the same run (see README, Benchmarks)."""
