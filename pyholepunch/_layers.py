"""The parts of pyholepunch and which part may import which, as data (README: "How it fits").

tests/test_layers.py reads every import in the package (function-level and type-only ones
too) and fails on an arrow this table does not allow; the README's "Layers" table is printed
from it (``markdown_table``) and the test checks that the two agree. A new part or a new
top-level module gets a row (or a prefix) here first.

A module belongs to the part whose prefix names it most precisely (``nat.cli`` is a command
front end, ``nat.profile`` is Nat). Every part may import its own modules and the foundation.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Part:
    name: str
    modules: tuple[str, ...]        # dotted prefixes below ``pyholepunch`` ("" is the package)
    may_import: tuple[str, ...]     # other parts' names (the foundation is always allowed)
    what: str


FOUNDATION = "Foundation"

PARTS: tuple[Part, ...] = (
    Part(FOUNDATION, ("errors", "address", "_process", "_service", "identity", "_layers"), (),
         "exceptions, the address vocabulary, child processes, `async with`, peer identities"),
    Part("Engine", ("engine",), (),
         "the contract, the Cython binding to csrc/, the pure twin"),
    Part("Stun", ("stun",), (),
         "codec, attributes, responder (sans-IO); client, server"),
    Part("Nat", ("nat",), ("Stun",),
         "profile, classify (verdict), probe (its I/O half), predict"),
    Part("Portmap", ("portmap",), (),
         "NAT-PMP, PCP, UPnP IGD"),
    Part("Strategy", ("strategy",), ("Nat",),
         "the plan as data, the planner"),
    Part("Signal", ("signal",), ("Strategy", "Nat", "Stun"),
         "frames, state machine, server, client, stores"),
    Part("Relay", ("relay",), ("Stun", "Engine", "Signal.frames"),
         "built-in hub and client, TURN client"),
    Part("Core", ("peer", "announce", "punch", "punch_mapping", "punch_passive", "punch_sequential",
                  "punchport", "race",
                  "relay_race", "relay_step", "session", "offer", "offer_clock", "backend",
                  "backend_relay", "connection",
                  "security", "report", "metrics"),
         ("Engine", "Stun", "Nat", "Portmap", "Strategy", "Signal", "Relay"),
         "the peer, the punch session (server-led or offer-led), the punch and relay steps, "
         "connections, end-to-end TLS, the report"),
    Part("Face", ("", "__main__", "cli", "serve", "api", "sync", "stun.__main__", "lab.__main__"),
         ("Core", "Engine", "Stun", "Nat", "Portmap", "Strategy", "Signal", "Relay", "Lab"),
         "the public API (`__init__`), the command front ends, the HTTP API"),
    Part("Lab", ("lab",), (),
         "the netns NAT lab (the library never needs it)"),
)

# Parts that only some of another part's modules may reach: "Signal.frames" is the sans-IO
# frame codec alone, which the relay client speaks without the rest of signaling.
SUBPARTS: dict[str, tuple[str, ...]] = {
    "Signal.frames": ("signal.protocol",),
}


def _matches(module: str, prefix: str) -> bool:
    return module == prefix or (prefix != "" and module.startswith(prefix + "."))


def part_of(module: str) -> Part | None:
    """The part of ``module`` (dotted, below ``pyholepunch``; "" is the package itself)."""
    best: tuple[int, Part] | None = None
    for part in PARTS:
        for prefix in part.modules:
            if _matches(module, prefix) and (best is None or len(prefix) > best[0]):
                best = (len(prefix), part)
    return best[1] if best else None


def allowed(importer: str, imported: str) -> bool:
    """May module ``importer`` import module ``imported`` (both below ``pyholepunch``)?"""
    src, dst = part_of(importer), part_of(imported)
    if src is None or dst is None:
        return False
    if dst.name in (src.name, FOUNDATION):
        return True
    if dst.name in src.may_import:
        return True
    return any(
        any(_matches(imported, m) for m in SUBPARTS.get(name, ()))
        for name in src.may_import
    )


def markdown_table() -> str:
    """The table as the README shows it."""
    def where(part: Part) -> str:
        return ", ".join(f"`{m or '__init__'}`" for m in part.modules)

    def may(part: Part) -> str:
        if part.name == FOUNDATION:
            return "nothing else of the package; every part may import it"
        names = [f"{n.split('.')[0]}'s {n.split('.')[1]} ("
                 + ", ".join(f"`{m}`" for m in SUBPARTS[n]) + ")" if n in SUBPARTS else n
                 for n in part.may_import]
        return ", ".join(names) or "nothing above it"

    lines = ["| part | what | modules (below `pyholepunch/`) | may import |", "|---|---|---|---|"]
    lines += [f"| {p.name} | {p.what} | {where(p)} | {may(p)} |" for p in PARTS]
    return "\n".join(lines)
