"""The fault-tolerant gRPC collective layer: transport, codecs, reducers and all-reduce.

It knows nothing of models or optimizers: it moves and reduces flat fp32
tensors among an ordered group of peers.
"""
