"""Rendezvous signaling (docs/protocol.md).

- ``protocol``: the wire format (length-prefixed msgpack frames) and message types, sans-IO
- ``connection``: the shared state machine, NTP-style clock estimation, the common start time
- ``auth``: access tokens and the per-peer rate limit, sans-IO
- ``tls`` / ``tlsproto``: server certificate, fingerprint pinning/TOFU; lean server-side TLS
- ``store``: name directory, online peers, sessions and routing (memory or Redis)
- ``server``: the asyncio rendezvous server node; ``peer_protocol``: one peer's connection to
  it (registration, clock sync, CONNECT/PUNCH, relay, results); ``client``: ``SignalClient``
"""
