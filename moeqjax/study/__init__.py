"""Bit allocation from router statistics (CLI-facing), progressive QAT and the allocation x objective study."""
