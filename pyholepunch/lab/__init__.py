"""The NAT lab: real Linux NATs of eight behaviours in network namespaces (DESIGN.md §8).

    from pyholepunch.lab import Lab, NAT_TYPES
    with Lab(a="port-restricted", b="symmetric-seq", rtt_ms=40) as lab:
        lab.run("a", ["ip", "addr"])
"""
from .lab import Lab
from .nat import NAT_TYPES, ROWS, TypeRow

__all__ = ["Lab", "NAT_TYPES", "ROWS", "TypeRow"]
