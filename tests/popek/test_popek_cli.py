"""`pyhv popek-goldberg`: the JSON shape of issue 6, the table, bad input."""

from __future__ import annotations

import json

import pytest
from popek_env import EMU_WHY, KVM_WHY

from pyhv.cli import main

pytestmark = [pytest.mark.timeout(60),
              pytest.mark.skipif(KVM_WHY is not None and EMU_WHY is not None,
                                 reason="no engine runs here")]


def test_json_has_the_issue_shape(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["popek-goldberg", "--json", "--only", "sgdt", "--only", "cli"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert {"host", "umip_supported", "results", "verdict"} <= set(d)
    assert isinstance(d["umip_supported"], bool)
    assert "cpu_model" in d["host"] and "kind" in d["host"]
    assert set(d["verdict"]) == {"umip_off", "umip_on"}
    for r in d["results"]:
        assert {"instruction", "engine", "umip", "outcome", "exception", "observed",
                "expected_at_cpl0"} <= set(r)
        assert r["outcome"] in ("trap", "silent", "same")
        assert r["instruction"] in ("sgdt", "cli")
        assert (r["exception"] is None) == (r["outcome"] != "trap")
    assert "sgdt" in d["verdict"]["umip_off"] and "cli" not in d["verdict"]["umip_off"]


def test_table_output(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["popek-goldberg", "--only", "popf"]) == 0
    out = capsys.readouterr().out
    assert "popf" in out and "silent" in out and "Verdict" in out


def test_unknown_instruction_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["popek-goldberg", "--only", "nope"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pyhv: unknown instruction(s) nope") and err.count("\n") == 1


@pytest.mark.skipif(EMU_WHY is not None, reason=f"needs the emu engine: {EMU_WHY}")
def test_emu_only_is_the_path_a_host_without_kvm_takes(
        capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["popek-goldberg", "--json", "--engine", "emu", "--only", "str"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["engines"] == ["emu"] and d["verdict_engine"] == "emu"
    assert {(r["engine"], r["umip"]) for r in d["results"]} == {("emu", False),
                                                                ("emu", True)}
    assert d["verdict"] == {"umip_off": ["str"], "umip_on": ["str"]}
