"""``async with`` for the package's long-lived objects (a peer, a server): one definition of
"start, and close again if starting fails halfway; close on the way out"."""
from __future__ import annotations

from typing import Self


class Service:
    """Base for objects with ``async start()`` and ``async close()`` used as ``async with``."""

    async def start(self) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        try:
            await self.start()
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
