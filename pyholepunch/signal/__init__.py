"""Rendezvous signaling (docs/protocol.md).

- ``protocol``: the wire format (length-prefixed msgpack frames) and message types, sans-IO
- ``machine``: the shared sans-IO state machine, NTP-style clock estimation, the common start time
- ``auth``: access tokens and the per-peer rate limit, sans-IO
- ``tls`` / ``tlsproto``: server certificate, fingerprint pinning/TOFU; lean TLS over memory
  BIOs (the server's, and the peers' end-to-end TLS in security.py)
- ``store``: name directory, online peers, sessions and routing (memory or Redis)
- ``server``: the asyncio rendezvous server node; ``server_peer``: one peer's connection to
  it (registration, clock sync, CONNECT/PUNCH, relay, results); ``client``: ``SignalClient``
"""
