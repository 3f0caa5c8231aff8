"""One side of an offer/answer punch session, as its own process in a lab node (run as a
script with a JSON job): it writes its offer to a plain file, waits for the other side's file,
connects, exchanges a line each way over the connection and writes what happened as JSON.
With ``answer`` it waits for the other side's offer first and writes its answer to it
(``offer(reply_to=...)``). No rendezvous server is involved: only the STUN (and TURN, or
built-in relay) server named in the job."""
from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any


@dataclass
class PunchJob:
    name: str
    stun: str
    offer_file: str                 # ours: written once made (atomically: a rename)
    their_offer_file: str           # theirs: waited for
    result_file: str
    relay: str | None = None
    turn_user: str | None = None
    turn_password: str | None = None
    relay_secret: str | None = None
    answer: bool = False            # wait for their offer, answer it
    clock_skew: float = 0.0         # s our Punch's clock is off
    strategies: list[str] | None = None
    lead: float = 1.0
    timeout: float = 15.0
    deadline: float = 45.0


async def _run(job: PunchJob) -> dict[str, Any]:
    import pyholepunch

    out: dict[str, Any] = {"name": job.name}
    async with pyholepunch.Punch(job.stun, name=job.name, relay=job.relay,
                                 turn_user=job.turn_user, turn_password=job.turn_password,
                                 relay_secret=job.relay_secret, lead=job.lead,
                                 clock=lambda: time.time() + job.clock_skew) as punch:
        out["peer_id"], out["nat"] = punch.peer_id, punch.tcp_profile.to_dict()

        async def theirs_now() -> tuple[bytes, float]:
            """Their message, and when it arrived (our Punch's clock): the file's time, as
            an app stamps a message on arrival — we may have been busy (classifying) then,
            and a late stamp would count as channel delay one way only."""
            path = Path(job.their_offer_file)
            while not path.exists():
                await asyncio.sleep(0.01)
            return path.read_bytes(), path.stat().st_mtime + punch.clock() - time.time()

        theirs, received = await theirs_now() if job.answer else (None, None)
        mine = await punch.offer(strategies=job.strategies, reply_to=theirs, received=received)
        tmp = Path(job.offer_file + ".tmp")
        tmp.write_bytes(mine)
        os.rename(tmp, job.offer_file)
        if theirs is None:
            theirs, received = await theirs_now()
        t0 = time.monotonic()
        try:
            conn = await punch.connect(theirs, timeout=job.timeout, received=received)
        except Exception as exc:   # noqa: BLE001 - what the application would see, for the test
            out.update(ok=False, error=f"{type(exc).__name__}: {exc}",
                       report=punch.last_report.to_dict() if punch.last_report else None)
            return out
        out.update(ok=True, elapsed=time.monotonic() - t0, report=conn.report.to_dict(),
                   route=str(conn.route), peer=conn.peer_id)
        async with conn:
            await conn.send(f"hello from {job.name}\n".encode())
            out["got"] = (await asyncio.wait_for(conn.reader.readline(), 5.0)).decode()
            ssl_obj = conn.writer.get_extra_info("ssl_object")
            out["tls"] = ssl_obj.version() if ssl_obj is not None else None
    return out


def main(raw: str) -> None:
    job = PunchJob(**json.loads(raw))

    async def bounded() -> dict[str, Any]:
        async with asyncio.timeout(job.deadline):
            return await _run(job)

    try:
        result = asyncio.run(bounded())
    except BaseException as exc:   # noqa: BLE001 - reported to the test
        result = {"name": job.name, "fatal": f"{type(exc).__name__}: {exc}"}
    Path(job.result_file).write_text(json.dumps(result, default=str))


def job_argv(job: PunchJob) -> list[str]:
    return [sys.executable, __file__, json.dumps(asdict(job))]


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    main(sys.argv[1])
