"""Protocol buffers of loconet: the .proto sources and their generated modules.

The generated ``*_pb2.py`` / ``*_pb2_grpc.py`` files are committed; regenerate
them with ``python -m protos.generate`` after editing a ``.proto``.
"""
