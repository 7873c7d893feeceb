"""A small network on this machine for --netns: namespaces on a bridge, shaped links, their commands and bookkeeping."""
