"""The gRPC plumbing: every server and channel (the coordinator's too), a peer's transport, its framing and pacing.

Also the admission of inbound calls (``admission.py``), addresses (``addresses.py``), the run's credentials
(``credentials.py``, which the coordinator checks too), why a TLS connection fails (``tlsprobe.py``) and whether a
peer can be reached (``reachability.py``).
"""
