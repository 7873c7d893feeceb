"""The fault-tolerant gRPC collective layer: transport, codecs, aggregators, all-reduce, membership and state sync.

It knows nothing of models or optimizers: it moves and reduces flat fp32
tensors among an ordered group of peers.

At the top: a member of a run (``elastic.py``, its syncs in ``elasticsync.py``
and ``syncphases.py``), what the optimizers use, and the all-reduce endpoint it
runs (``allreduce.py``), with the small basics every part may use. The parts
are sub-packages: ``net`` (gRPC servers, channels and the transport),
``codecs``, ``reduce`` (one round and its aggregators), ``hosts`` (the
hierarchical round), ``membership`` (the coordinator's client), ``statesync``
and ``gradcoding``. docs/collectives.md lists every module.
"""
