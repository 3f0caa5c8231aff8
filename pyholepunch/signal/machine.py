"""Sans-IO signaling connection: the state machine both ends share, and clock estimation.

No sockets, no clocks: callers pass bytes in (``receive_data``) and get bytes out (``send``);
time is an argument. One transitions table, seen from the wire: a message moving from server
to client (or back) changes the state the same way on both ends, so client and server
connections cannot disagree about where the conversation is.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass

from ..errors import LocalProtocolError, ProtocolError, RemoteProtocolError
from .protocol import (
    DEFAULT_MAX_FRAME,
    Connect,
    Error,
    ErrorCode,
    FrameDecoder,
    Hello,
    Message,
    Ping,
    Pong,
    Punch,
    Register,
    Registered,
    Relay,
    RelayGrant,
    Result,
    Update,
    decode_body,
    encode_frame,
)


class Role(enum.Enum):
    CLIENT = "client"
    SERVER = "server"


class State(enum.Enum):
    START = "start"                    # TLS up, HELLO not yet sent/seen
    AWAIT_REGISTER = "await-register"  # HELLO sent, the client must prove its key
    SYNCING = "syncing"                # registered key, server measuring the clock (ping/pong)
    READY = "ready"
    CLOSED = "closed"


S2C, C2S = "s2c", "c2s"
_READY_S2C = (Ping, Pong, Punch, RelayGrant)
_READY_C2S = (Ping, Pong, Update, Connect, Result, Relay)

# (state, direction, message type) -> next state
TRANSITIONS: dict[tuple[State, str, type[Message]], State] = {
    (State.START, S2C, Hello): State.AWAIT_REGISTER,
    (State.AWAIT_REGISTER, C2S, Register): State.SYNCING,
    (State.SYNCING, S2C, Ping): State.SYNCING,
    (State.SYNCING, C2S, Pong): State.SYNCING,
    (State.SYNCING, S2C, Registered): State.READY,
    **{(State.READY, S2C, m): State.READY for m in _READY_S2C},
    **{(State.READY, C2S, m): State.READY for m in _READY_C2S},
}


@dataclass(frozen=True, slots=True)
class ConnectionClosed:
    """The peer sent a fatal ERROR (kept in ``error``) or the stream ended."""

    error: Error | None


class SignalConnection:
    """One end of a signaling connection: frames, validation and the state machine."""

    def __init__(self, role: Role, *, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        self.role = role
        self.state = State.START
        self.max_frame = max_frame
        self._decoder = FrameDecoder(max_frame)
        self.frames_in = 0
        self.frames_out = 0

    def _move(self, direction: str, msg: Message, error_cls: type[ProtocolError]) -> None:
        if isinstance(msg, Error):
            # A non-fatal error answers one request and is only legal once registered.
            if msg.fatal or self.state is not State.READY:
                self.state = State.CLOSED
            return
        nxt = TRANSITIONS.get((self.state, direction, type(msg)))
        if nxt is None:
            raise error_cls(f"{msg.TYPE} not allowed from {'server' if direction == S2C else 'client'}"
                            f" in state {self.state.value}", code=ErrorCode.UNEXPECTED)
        self.state = nxt

    @property
    def closed(self) -> bool:
        return self.state is State.CLOSED

    def send(self, msg: Message) -> bytes:
        """Encode ``msg`` and advance the state; LocalProtocolError if it is illegal now."""
        if self.state is State.CLOSED:
            raise LocalProtocolError(f"cannot send {msg.TYPE}: connection closed",
                                     code=ErrorCode.UNEXPECTED)
        direction = S2C if self.role is Role.SERVER else C2S
        data = encode_frame(msg, self.max_frame)
        self._move(direction, msg, LocalProtocolError)
        self.frames_out += 1
        return data

    def receive_data(self, data: bytes) -> list[Message | ConnectionClosed]:
        """Feed stream bytes; return complete messages (or ConnectionClosed on b"").

        Raises RemoteProtocolError (with ``.code``) for a bad frame or an illegal move; the
        messages before the bad one were valid and are lost with the connection, by design:
        the driver answers ERROR and closes.
        """
        if self.state is State.CLOSED:
            return []
        if not data:
            self.state = State.CLOSED
            return [ConnectionClosed(None)]
        events: list[Message | ConnectionClosed] = []
        direction = C2S if self.role is Role.SERVER else S2C
        for body in self._decoder.feed(data):
            msg = decode_body(body)
            self.frames_in += 1
            self._move(direction, msg, RemoteProtocolError)
            if isinstance(msg, Error) and self.closed:
                events.append(ConnectionClosed(msg))
                break
            events.append(msg)
        return events


@dataclass(frozen=True, slots=True)
class ClockSample:
    offset: float       # remote clock minus local clock, seconds
    rtt: float          # network round trip (remote processing time removed), seconds
    at: float           # local time of the sample


class ClockEstimator:
    """NTP-style offset/RTT from ping/pong timestamps, keeping the minimum-RTT sample.

    The sample with the least round trip had the least queueing, so its offset is the most
    trustworthy (NTP's clock filter). Only the last ``window`` samples count, so a clock step
    or a route change is followed within ``window`` pings.
    """

    def __init__(self, window: int = 8) -> None:
        self._window = window
        # Plain tuples of floats, replaced at each sample (a ping's rate): the collector stops
        # tracking those, where a list of ClockSamples was ``window`` + 1 tracked objects
        # for every registered peer, each traversed by every full collection (#18).
        self._samples: tuple[tuple[float, float, float], ...] = ()   # (offset, rtt, at)
        self._best: tuple[float, float, float] | None = None   # chosen at each sample
        self.count = 0

    def add(self, t1: float, t2: float, t3: float, t4: float) -> ClockSample:
        """t1 local send, t2 remote receive, t3 remote send, t4 local receive."""
        rtt = max(0.0, (t4 - t1) - (t3 - t2))
        sample = (((t2 - t1) + (t3 - t4)) / 2, rtt, t4)
        self._samples = (*self._samples[max(0, len(self._samples) + 1 - self._window):], sample)
        self._best = min(self._samples, key=_rtt_of)
        self.count += 1
        return ClockSample(*sample)

    @property
    def best(self) -> ClockSample | None:
        return ClockSample(*self._best) if self._best else None

    @property
    def offset(self) -> float:
        return self._best[0] if self._best else 0.0

    @property
    def rtt(self) -> float | None:
        return self._best[1] if self._best else None

    def agreeing(self, tolerance: float) -> int:
        """How many samples came within ``tolerance`` s of the best round trip."""
        best = self.best
        return 0 if best is None else sum(s[1] <= best.rtt + tolerance for s in self._samples)

    @property
    def spread(self) -> float:
        """How far the window's round trips reach above the best one (max - min), seconds.

        The best round trip halved is the one-way time a PUNCH is expected to take; with
        jitter or queueing a message can take up to the spread longer than that (each
        direction of a round trip may carry all of it)."""
        if not self._samples:
            return 0.0
        rtts = [s[1] for s in self._samples]
        return max(rtts) - min(rtts)


def _rtt_of(sample: tuple[float, float, float]) -> float:
    return sample[1]


MAX_SPREAD_MARGIN = 0.25     # seconds: a peer's jitter never delays a punch by more than this


def common_start(now: float, rtts: list[float], margin: float,
                 spreads: list[float] | None = None) -> float:
    """Earliest common start (local clock): every PUNCH has arrived, plus a margin.

    The margin is derived from what was measured: ``margin`` (the floor: a peer's own time
    from PUNCH to its engine waiting on the start) plus the larger RTT spread of the two
    peers (how much later than rtt/2 a PUNCH may arrive), capped at MAX_SPREAD_MARGIN. On a
    steady path the spread is a few ms, so a punch starts a few ms after the slower PUNCH
    arrives; a jittery path pays for its jitter only.
    """
    jitter = min(max(spreads or [0.0], default=0.0), MAX_SPREAD_MARGIN)
    return now + max(rtts, default=0.0) / 2 + margin + max(0.0, jitter)
