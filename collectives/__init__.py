"""The fault-tolerant gRPC collective layer: transport, codecs, aggregators, all-reduce, membership and state sync.

It knows nothing of models or optimizers: it moves and reduces flat fp32
tensors among an ordered group of peers.
"""
