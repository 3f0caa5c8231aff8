"""Is a pyholepunch rendezvous server at an address? (SignalClient.check_server)

Asked while the peer classifies its NAT. The connection that answered is kept (``Checked``):
the registration goes on over it, so TCP and TLS — two or three round trips that loss can
stretch by a retransmission timeout each — are off the start's critical path (#19).
"""
from __future__ import annotations

import asyncio
import logging
import ssl
import time
from dataclasses import dataclass

from ..address import Address
from ..errors import ProtocolError, SignalingError
from ..stun.client import connect_rearming
from .machine import ConnectionClosed, Role, SignalConnection
from .protocol import Hello
from .tls import KnownServers, client_context, verify_server

log = logging.getLogger(__name__)

NOT_A_SERVER = -1           # SignalingError.code: no server of ours at that address (local)
CHECK_FLOOR = 1.0           # check_server: seconds a loaded server may take, plus...
CHECK_RTTS = 8.0            # ...this many round trips (TLS 1.3 and HELLO need about two)...
CHECK_LOSS = 0.8            # ...and TCP's retransmissions of a lost flight (RTO >= 0.2 s,
                            # doubling): at 10 % loss + 20 ms jitter 1.28 s was seen to pass
                            # a real server off as "not a pyholepunch server"
CHECK_ATTEMPTS = 2          # connections tried before a broken one names the server
KEEP_CHECKED = 5.0          # s: the checked connection registers if used by then (the server
                            # allows 10 s from TCP accept to REGISTERED)


@dataclass(frozen=True, slots=True)
class Checked:
    """The checked connection, HELLO received, kept for the registration."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    conn: SignalConnection
    fp: bytes
    hello: Hello
    at: float                   # time.monotonic() of the HELLO

    def fresh(self) -> bool:
        return time.monotonic() - self.at < KEEP_CHECKED and not self.writer.is_closing()

    def close(self) -> None:
        self.writer.transport.abort()


async def check_server(server: Address, *, pin: bytes | None, known: KnownServers | None,
                       max_frame: int, connect_timeout: float, floor: float = CHECK_FLOOR,
                       rtts: float = CHECK_RTTS) -> tuple[float, Checked]:
    """The RTT the server at ``server`` answered in, and its connection (HELLO received).

    The TCP connect takes one round trip: that measures the RTT (a lost SYN is sent again
    after 0.25 s: stun.client.connect_rearming). A pyholepunch server then completes TLS and
    sends HELLO within a few more; so the whole check is bounded by ``floor + rtts * RTT``
    plus a lost flight's retransmissions (at most ``connect_timeout``), and anything else —
    no TLS, another protocol, silence, a TLS server that says nothing — fails here with a
    SignalingError (code ``NOT_A_SERVER``) naming what was seen, instead of a timeout much
    later. The certificate is checked like any connection's (pin or known servers).

    Two failures are tried once more on a fresh connection, as a lossy path causes them (each
    seen once in 100 runs at 10 % loss + 20 ms jitter): a connection broken before any TLS
    answer (a server of another kind that hangs up does so again, one round trip later), and
    no HELLO after a TLS handshake whose certificate passed (a TLS server of another kind that
    says nothing is named one budget later).
    """
    host, port = server
    where = f"{host}:{port}"
    for attempt in range(CHECK_ATTEMPTS):
        sock, rtt, _ = await connect_rearming(server, timeout=connect_timeout, any_port=True)
        reader, writer = await asyncio.open_connection(sock=sock)
        budget = min(connect_timeout, floor + rtts * rtt + CHECK_LOSS)
        what, retry = "nothing", False
        try:
            async with asyncio.timeout(budget):
                what = "no TLS handshake"
                await writer.start_tls(client_context(), server_hostname=host,
                                       ssl_handshake_timeout=budget)
                ssl_obj = writer.get_extra_info("ssl_object")
                fp = verify_server(ssl_obj.getpeercert(binary_form=True) if ssl_obj else None,
                                   host, port, pin=pin, known=known)
                what = "no HELLO after the TLS handshake"
                conn = SignalConnection(Role.CLIENT, max_frame=max_frame)
                while True:
                    data = await reader.read(65536)
                    for msg in conn.receive_data(data):
                        if isinstance(msg, Hello):
                            return rtt, Checked(reader, writer, conn, fp, msg, time.monotonic())
                        if isinstance(msg, ConnectionClosed):
                            what = (f"it closed the connection ({msg.error.reason})" if msg.error
                                    else "it closed the connection before HELLO")
                            raise ConnectionError(what)
        except TimeoutError:
            retry = what == "no HELLO after the TLS handshake"     # its certificate passed
            what = f"{what} within {budget:.2f} s (RTT {rtt * 1e3:.1f} ms)"
        except (ssl.SSLError, ConnectionError, ProtocolError) as exc:
            if what == "no TLS handshake":
                retry = isinstance(exc, ConnectionError)           # broken, not answered
                what = f"its answer is not TLS ({exc!r})"
            elif not isinstance(exc, ConnectionError) or str(exc) != what:
                what = f"{what}: {exc}"
        except BaseException:
            writer.transport.abort()
            raise
        writer.transport.abort()
        if not retry or attempt + 1 == CHECK_ATTEMPTS:
            break
        log.debug("%s: %s; once more on a fresh connection", where, what)
    raise SignalingError(f"{where} is not a pyholepunch rendezvous server: {what}",
                         code=NOT_A_SERVER)
