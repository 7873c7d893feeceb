"""One round of the all-reduce and what it combines: send and receive sides, parts, aggregators, kept results,
catching up by them."""
