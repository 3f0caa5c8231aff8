"""Sources and sinks for the stream: any file descriptor, a command, an echo.

Each kind of stdin/stdout in the way that suits it, and never one that blocks the loop:
regular files and /dev/null directly in the loop (they never wait); pipes and sockets by
asyncio's pipe transports (their non-blocking flag put back afterwards, as the shell may share
it); anything else, a terminal above all, by a daemon thread (``connect_read_pipe`` refuses
regular files and /dev/null, and a terminal must not be left non-blocking). A few chunks in
flight bound memory.
"""
from __future__ import annotations

import asyncio
import atexit
import collections
import errno
import fcntl
import os
import queue
import stat
import threading
from typing import Any

CHUNK = 1024 * 1024
DEPTH = 4                        # chunks in flight per direction
PIPE_SIZE = 1024 * 1024


def _is_file(fd: int) -> bool:
    """A regular file or /dev/null-like device: reads and writes never wait, so the loop does
    them itself (a thread would only add hand-offs)."""
    try:
        mode = os.fstat(fd).st_mode
    except OSError:
        return False
    return stat.S_ISREG(mode) or (stat.S_ISCHR(mode) and not os.isatty(fd))


class FileReader:
    """A regular file, read in the loop's thread."""

    def __init__(self, fd: int, chunk: int = CHUNK) -> None:
        self._fd, self._chunk = fd, chunk

    async def read(self) -> bytes:
        return os.read(self._fd, self._chunk)


class FileWriter:
    """A regular file (or /dev/null), written in the loop's thread."""

    def __init__(self, fd: int) -> None:
        self._fd = fd

    async def write(self, data: bytes | memoryview) -> None:
        _write_all(self._fd, data)

    async def close(self) -> None:
        _detach(self._fd)


def _is_pipe(fd: int) -> bool:
    try:
        mode = os.fstat(fd).st_mode
    except OSError:
        return False
    return stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)


def reader_for(fd: int) -> FileReader | PipeReader | FdReader:
    """The cheapest way to read ``fd`` that never blocks the loop (a thread for ttys)."""
    if _is_file(fd):
        return FileReader(fd)
    return PipeReader(fd) if _is_pipe(fd) else FdReader(fd)


def writer_for(fd: int) -> FileWriter | PipeWriter | FdWriter:
    if _is_file(fd):
        return FileWriter(fd)
    return PipeWriter(fd) if _is_pipe(fd) else FdWriter(fd)


def _widen_pipe(fd: int) -> None:
    """A 1 MiB pipe buffer instead of 64 KiB: the process on the other end (``cat``, a
    consumer of our output) wakes up and we wake up a sixteenth as often. Best effort."""
    if hasattr(fcntl, "F_SETPIPE_SZ") and stat.S_ISFIFO(os.fstat(fd).st_mode):
        try:
            fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
        except OSError:
            pass


class _NonBlocking:
    """asyncio's pipe transports make the descriptor non-blocking, and that flag lives in the
    open file description, which others (a shell, the next command of a pipeline) may share:
    it is put back as soon as we are done, and at exit whatever happens."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._blocking = os.get_blocking(fd)
        atexit.register(self.restore)

    def restore(self) -> None:
        try:
            os.set_blocking(self.fd, self._blocking)
        except OSError:
            pass
        atexit.unregister(self.restore)


class _Chunks(asyncio.Protocol):
    """What a pipe transport reads, handed over as the very bytes objects it read (a
    StreamReader would copy each byte twice more); reading pauses beyond ``limit``."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.chunks: collections.deque[bytes] = collections.deque()
        self.size = 0
        self.end: OSError | None | bool = False        # False: open; None: EOF; else the error
        self.transport: asyncio.ReadTransport | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._paused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.ReadTransport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.chunks.append(data)
        self.size += len(data)
        if self.size > self.limit and self.transport is not None and not self._paused:
            self._paused = True
            self.transport.pause_reading()
        self._wake()

    def eof_received(self) -> bool:
        if self.end is False:
            self.end = None
        self._wake()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self.end is False:
            self.end = exc if isinstance(exc, OSError) else None
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def get(self) -> bytes:
        while not self.chunks:
            if self.end is not False:
                if isinstance(self.end, OSError):
                    raise self.end
                return b""
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
        if len(self.chunks) == 1:
            data = self.chunks.popleft()
        else:           # what piled up while we were busy, as one frame: fewer, larger frames
            data = b"".join(self.chunks)
            self.chunks.clear()
        self.size -= len(data)
        if self._paused and self.size <= self.limit // 2 and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()
        return data


class PipeReader:
    """A pipe or socket, read by the event loop (no thread, no hand-offs, no copies)."""

    def __init__(self, fd: int, chunk: int = CHUNK) -> None:
        self._fd, self._limit = fd, DEPTH * chunk
        self._chunks: _Chunks | None = None
        self._flags: _NonBlocking | None = None

    async def read(self) -> bytes:
        if self._chunks is None:
            loop = asyncio.get_running_loop()
            self._flags = _NonBlocking(self._fd)
            _widen_pipe(self._fd)
            chunks = self._chunks = _Chunks(self._limit)
            pipe = os.fdopen(os.dup(self._fd), "rb", buffering=0)
            await loop.connect_read_pipe(lambda: chunks, pipe)
        data = await self._chunks.get()
        if not data and self._flags is not None:
            self._flags.restore()
        return data


class PipeWriter:
    """A pipe or socket, written by the event loop; ``close()`` flushes, then detaches it."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._writer: asyncio.StreamWriter | None = None
        self._flags: _NonBlocking | None = None
        self._closed = False

    async def _open(self) -> asyncio.StreamWriter:
        if self._writer is None:
            loop = asyncio.get_running_loop()
            self._flags = _NonBlocking(self._fd)
            _widen_pipe(self._fd)
            pipe = os.fdopen(os.dup(self._fd), "wb", buffering=0)
            transport, protocol = await loop.connect_write_pipe(
                lambda: asyncio.streams.FlowControlMixin(loop), pipe)
            transport.set_write_buffer_limits(high=DEPTH * CHUNK)
            self._writer = asyncio.StreamWriter(transport, protocol, None, loop)
        return self._writer

    async def write(self, data: bytes | memoryview) -> None:
        writer = await self._open()
        if writer.transport.is_closing():
            raise BrokenPipeError(errno.EPIPE, "the output was closed by its reader")
        writer.write(data)
        await writer.drain()

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        writer = await self._open()
        await writer.drain()
        writer.transport.close()       # everything is written: the buffer is empty
        if self._flags is not None:
            self._flags.restore()
        _detach(self._fd)


def _detach(fd: int) -> None:
    """``fd`` now points at /dev/null: whoever reads our output sees its end now, and later
    writes to it (at exit) go nowhere harmlessly."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, fd)
    finally:
        os.close(devnull)


class FdReader:
    """Reads ``fd`` (pipe, tty, socket) to its end in a daemon thread; ``await read()``."""

    def __init__(self, fd: int, chunk: int = CHUNK, depth: int = DEPTH) -> None:
        self._loop = asyncio.get_running_loop()
        self._items: asyncio.Queue[bytes | OSError] = asyncio.Queue()
        self._slots = threading.Semaphore(depth)
        self._thread = threading.Thread(target=self._run, args=(fd, chunk), daemon=True,
                                        name=f"pyholepunch-read-{fd}")
        self._thread.start()

    def _run(self, fd: int, chunk: int) -> None:
        while True:
            self._slots.acquire()
            item: bytes | OSError
            try:
                item = os.read(fd, chunk)
            except OSError as exc:
                item = b"" if exc.errno == errno.EBADF else exc   # no stdin at all: empty input
            try:
                self._loop.call_soon_threadsafe(self._items.put_nowait, item)
            except RuntimeError:         # the loop is gone: nobody is reading any more
                return
            if not isinstance(item, bytes) or not item:
                return

    async def read(self) -> bytes:
        item = await self._items.get()
        self._slots.release()
        if isinstance(item, OSError):
            raise item
        return item


class FdWriter:
    """Writes to ``fd`` (pipe, tty, socket) in a daemon thread; ``close()`` waits for every
    byte, then detaches it."""

    def __init__(self, fd: int, depth: int = DEPTH) -> None:
        self._loop = asyncio.get_running_loop()
        self._fd = fd
        self._jobs: queue.SimpleQueue[bytes | asyncio.Future[None]] = queue.SimpleQueue()
        self._slots = asyncio.Semaphore(depth)
        self._error: OSError | None = None
        self._closed = False
        threading.Thread(target=self._run, daemon=True, name=f"pyholepunch-write-{fd}").start()

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if isinstance(job, asyncio.Future):
                self._call(_settle, job, self._error)
                return
            if self._error is None:
                try:
                    _write_all(self._fd, job)
                except OSError as exc:
                    self._error = exc
            self._call(self._slots.release)

    def _call(self, fn: Any, *args: Any) -> None:
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:
            pass

    async def write(self, data: bytes | memoryview) -> None:
        if self._error is not None:
            raise self._error
        await self._slots.acquire()
        self._jobs.put(bytes(data))        # the thread writes it later: a copy of the slice

    async def close(self) -> None:
        """Every byte written, then the descriptor detached (see ``_detach``)."""
        if self._closed:
            return
        self._closed = True
        done: asyncio.Future[None] = self._loop.create_future()
        self._jobs.put(done)
        await done
        _detach(self._fd)


def _settle(fut: asyncio.Future[None], error: OSError | None) -> None:
    if fut.done():
        return
    if error is not None:
        fut.set_exception(error)
    else:
        fut.set_result(None)


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


class EchoPipe:
    """Sink and source at once: what is written is read back (``listen --echo``)."""

    def __init__(self, depth: int = DEPTH) -> None:
        self._items: asyncio.Queue[bytes] = asyncio.Queue(depth)

    async def write(self, data: bytes | memoryview) -> None:
        await self._items.put(bytes(data))     # read back later: a copy of the slice

    async def close(self) -> None:
        await self._items.put(b"")

    async def read(self) -> bytes:
        return await self._items.get()


class Command:
    """A shell command as sink (its stdin) and source (its stdout) for ``listen --exec``.

    Its stdin closes at the peer's end-of-stream; the end of its stdout is our end-of-stream,
    sent only once it has exited 0 (any other status fails the stream with that status).
    """

    def __init__(self, command: str) -> None:
        self.command = command
        self._proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        self._proc = await asyncio.create_subprocess_shell(
            self.command, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)

    @property
    def proc(self) -> asyncio.subprocess.Process:
        assert self._proc is not None, "Command.start() first"
        return self._proc

    async def write(self, data: bytes | memoryview) -> None:
        stdin = self.proc.stdin
        assert stdin is not None
        try:
            stdin.write(data)
            await stdin.drain()
        except (BrokenPipeError, ConnectionResetError):
            raise BrokenPipeError(errno.EPIPE, f"command {self.command!r} stopped reading its "
                                  "input before the peer's data ended") from None

    async def close(self) -> None:
        stdin = self.proc.stdin
        assert stdin is not None
        stdin.close()
        try:
            await stdin.wait_closed()
        except (BrokenPipeError, ConnectionResetError):
            pass

    async def read(self) -> bytes:
        stdout = self.proc.stdout
        assert stdout is not None
        data = await stdout.read(CHUNK)
        if not data:
            status = await self.proc.wait()
            if status != 0:
                raise OSError(f"command {self.command!r} exited with status {status}")
        return data

    async def stop(self) -> None:
        """After a failed stream: end the command (it may still wait for input)."""
        proc = self._proc
        if proc is None or proc.returncode is not None:
            return
        proc.terminate()
        try:
            async with asyncio.timeout(5.0):
                await proc.wait()
        except TimeoutError:
            proc.kill()
            await proc.wait()
