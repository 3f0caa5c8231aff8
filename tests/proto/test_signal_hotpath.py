"""The rendezvous server's hot-path shortcuts (#18) keep what they replace: the TLS layer's
read loop that stops without an SSLWantReadError, its recv_into buffer, and _punch_at."""
from __future__ import annotations

import asyncio
import ssl
from dataclasses import fields, replace
from typing import Any

import pytest

from pyholepunch.signal.protocol import Punch
from pyholepunch.signal.server import _punch_at
from pyholepunch.signal.tls import client_context, generate_credentials
from pyholepunch.signal.tlsproto import BufferedTls, TlsTransport


def test_punch_at_is_replace() -> None:
    p = Punch(session="s" * 16, role="responder", start_at=1.0, peer={"peer_id": "x"},
              plan={"k": 1}, spread=0.25)
    assert _punch_at(p, 2.5) == replace(p, start_at=2.5)
    # _punch_at names every field: a new one must be added there
    assert [f.name for f in fields(Punch)] == ["session", "role", "start_at", "peer", "plan",
                                               "spread"]


class _App(asyncio.Protocol):
    def __init__(self) -> None:
        self.data = b""
        self.eof = False

    def data_received(self, data: bytes) -> None:
        self.data += data

    def eof_received(self) -> bool:
        self.eof = True
        return True


class _Plain(asyncio.Transport):
    """The ciphertext side: what the TLS layer writes goes to the client's BIO."""

    def __init__(self, out: ssl.MemoryBIO) -> None:
        super().__init__()
        self.out = out

    def write(self, data: Any) -> None:
        self.out.write(data)

    def is_closing(self) -> bool:
        return False

    def close(self) -> None:
        pass

    def abort(self) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0


def _feed(tls: TlsTransport, data: bytes, buffered: bool) -> None:
    if buffered:
        assert isinstance(tls, BufferedTls)
        view = tls.get_buffer(-1)
        view[:len(data)] = data
        tls.buffer_updated(len(data))
    else:
        tls.data_received(data)


@pytest.mark.asyncio
@pytest.mark.parametrize("buffered", [False, True])
@pytest.mark.parametrize("split", [1, 7, 100, 10_000])
async def test_tls_delivers_every_record_however_split(buffered: bool, split: int) -> None:
    app = _App()
    tls = (BufferedTls if buffered else TlsTransport)(
        generate_credentials().ssl_context(), lambda: app, handshake_timeout=None)
    to_client = ssl.MemoryBIO()
    tls.connection_made(_Plain(to_client))
    cin, cout = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = client_context()
    client.check_hostname, client.verify_mode = False, ssl.CERT_NONE
    c = client.wrap_bio(cin, cout, server_side=False)
    for _ in range(10):
        try:
            c.do_handshake()
            break
        except ssl.SSLWantReadError:
            pass
        _feed(tls, cout.read(), buffered)
        cin.write(to_client.read())
    _feed(tls, cout.read(), buffered)          # the client's Finished
    sent = b""
    for i, size in enumerate([300, 5, 20_000, 1, 16_384, 70]):   # several records, one > 16 KiB
        chunk = bytes([i]) * size
        c.write(chunk)
        sent += chunk
    wire = cout.read()
    for at in range(0, len(wire), split):
        _feed(tls, wire[at:at + split], buffered)
    assert app.data == sent
    assert not app.eof
    try:
        c.unwrap()                               # close_notify after the data
    except ssl.SSLWantReadError:
        pass
    _feed(tls, cout.read(), buffered)
    assert app.eof
