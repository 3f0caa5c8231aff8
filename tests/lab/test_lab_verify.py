"""`lab verify`: every type measures as its docs/lab.md row, and a wrong row is caught."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from pyholepunch.lab import NAT_TYPES, verify

pytestmark = pytest.mark.lab


@pytest.fixture(scope="module")
def results() -> list[verify.Measured]:
    return verify.verify()  # all eight types, concurrently


def test_every_type_matches_its_row(results: list[verify.Measured]) -> None:
    assert [m.nat_type for m in results] == list(NAT_TYPES)
    bad = [m for m in results if not m.ok]
    assert not bad, "\n" + verify.table(results)


def test_measurements_are_specific(results: list[verify.Measured]) -> None:
    by = {m.nat_type: m for m in results}
    assert by["symmetric-seq"].allocation == "sequential" and by["symmetric-seq"].delta == 1
    assert by["port-restricted-rst"].unsolicited_syn == "rst"
    assert by["full-cone"].filtering == "endpoint-independent"
    assert by["restricted-cone"].filtering == "address-dependent"
    assert by["cgnat"].hairpin == "yes/no"
    # cgnat's observed address is the carrier's, its mapping still port-preserving
    raw = by["cgnat"].raw
    assert raw["tcp_map"][0] == [raw["public"], raw["local"]["tcp"]] or \
        tuple(raw["tcp_map"][0]) == (raw["public"], raw["local"]["tcp"])


@pytest.mark.parametrize("measured_as, claimed", [("full-cone", "port-restricted"),
                                                  ("symmetric-random", "symmetric-seq"),
                                                  ("port-restricted", "port-restricted-rst"),
                                                  ("none", "full-cone")])
def test_a_behaviour_that_differs_from_the_row_fails(results: list[verify.Measured], measured_as: str,
                                                     claimed: str) -> None:
    raw = next(m.raw for m in results if m.nat_type == measured_as)
    m = verify.interpret(claimed, raw)
    assert not m.ok and m.problems


def test_cli_verify_exit_code_and_json() -> None:
    r = subprocess.run([sys.executable, "-m", "pyholepunch.lab", "verify", "--type", "port-restricted-rst",
                        "--json"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    (doc,) = json.loads(r.stdout)
    assert doc["nat_type"] == "port-restricted-rst" and doc["ok"] and doc["unsolicited_syn"] == "rst"
    r = subprocess.run([sys.executable, "-m", "pyholepunch.lab", "verify", "--type", "nope"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "nope" in r.stderr
