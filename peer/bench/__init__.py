"""``loconet bench ...``: benchmarks that print JSON, each against a baseline measured in the same run."""
