"""Punch strategy: from two TCP NAT profiles to an ordered plan of steps (docs/architecture.md, "Strategy").

Pure and deterministic: no sockets, no clock, no randomness. The rendezvous server calls
:func:`plan` once per CONNECT and sends ``plan.to_dict()`` to both peers inside PUNCH, so both
sides execute the very same plan; :meth:`Plan.from_dict` validates what arrived.

Vocabulary
----------
- *Roles*: ``initiator`` (sent CONNECT) and ``responder``. Every step tells each role what to do
  (:class:`RoleInstruction`); all times are relative to the common ``start_at`` of that step.
- *Announced port*: the external port the server observed for the local port a peer punches
  from (the peer binds that same local port again, SO_REUSEPORT). For a port-preserving NAT it
  equals the local port; for any endpoint-independent mapping it is the port the peer will
  appear from. For a sequential symmetric NAT it is the *most recent* mapping the server saw,
  the base of the prediction ``announced + delta * i`` (i = 1, 2, ...).
- *Classes*: each profile folds into one :class:`Behaviour` (open, address-filtering cone,
  port-filtering cone, sequential symmetric, random symmetric, unknown); one table
  (``_RULES``) maps each unordered pair of classes to its ordered tactics.

Steps in the same ``parallel`` group may run at the same time (each on its own local port);
the first success wins and the others are abandoned. Running them one after another instead
is always correct, only slower. :func:`plan` emits no groups today (see the LAN step).

Dual stack (docs/architecture.md): :func:`plan_race` plans each address family both peers can be
dialled in (strategy/candidates.py) with :func:`plan` and tags the steps with the family;
the families run as lanes of an RFC 8305 race, IPv6 first, IPv4 ``race_delay`` later.

Checked in the NAT lab (40 ms RTT, native engine, pyholepunch.punch executing the plans): the
first step of every one of the 34 traversable lab pairs connected; birthday 1024 x 1024
connected 20/20 (port-restricted-rst, cgnat), also with the cone side 100 ms late; 1024 x 512
(the cone side's half: issue 18) 20/20 with each of port-restricted, -rst and cgnat.
"""
from .candidates import Candidate, parse_candidates
from .planner import Behaviour, answers_unsolicited, behaviour, birthday_probability, plan
from .race import NO_COMMON_FAMILY, plan_race, race_delay
from .steps import (
    MAX_BUDGET,
    MAX_COUNT,
    MAX_STEPS,
    PLAN_VERSION,
    PORT_RANGE,
    ROLES,
    Action,
    Plan,
    PortChoice,
    RoleInstruction,
    Step,
    StepKind,
    Target,
    remote_ports,
)

__all__ = ["NO_COMMON_FAMILY", "Candidate", "parse_candidates", "plan_race", "race_delay",
           "MAX_BUDGET", "MAX_COUNT", "MAX_STEPS", "PLAN_VERSION", "PORT_RANGE", "ROLES", "Action",
           "Behaviour", "Plan", "PortChoice", "RoleInstruction", "Step", "StepKind", "Target",
           "answers_unsolicited", "behaviour", "birthday_probability", "plan", "remote_ports"]
