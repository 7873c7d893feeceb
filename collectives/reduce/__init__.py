"""One round of the all-reduce and what it combines: send and receive sides, parts, aggregators, results."""
