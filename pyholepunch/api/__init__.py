"""The local HTTP API (``pyholepunch api``, extra ``pyholepunch[api]``): p2pd's routes and ours
over one Peer, for programs in any language. See docs/api.md.

Importing this package does not import aiohttp; ``pyholepunch.api.app`` does.
"""
from __future__ import annotations

DEFAULT_LISTEN = ("127.0.0.1", 12333)

__all__ = ["DEFAULT_LISTEN"]
