"""The NAT lab: real Linux NATs of eight behaviours in network namespaces (docs/lab.md).

    from pyholepunch.lab import Lab, NAT_TYPES
    with Lab(a="port-restricted", b="symmetric-seq", rtt_ms=40) as lab:
        lab.run("a", ["ip", "addr"])
"""
from ..errors import LabError
from ._ns import entered, process_alive, require_support
from .lab import Lab
from .nat import NAT_TYPES, ROWS, TypeRow


def unavailable(delay: bool = True) -> str | None:
    """Why this machine cannot build the lab (not Linux, not root, a tool missing), or None."""
    try:
        require_support(delay)
    except LabError as exc:
        return str(exc)
    return None


__all__ = ["Lab", "NAT_TYPES", "ROWS", "TypeRow", "entered", "process_alive", "require_support",
           "unavailable"]
