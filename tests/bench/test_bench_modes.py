"""`pyhv bench modes` (issue 13's comparison): a tiny-count run on the engines this host
has prints the table with every requested (loop, engine) cell and writes a PNG and an SVG
that parse; the targets are judged from the numbers given (no wall-clock assertion
anywhere: at tiny counts the figures are noise, only their presence is checked).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from pyhv.benchmodes import Results, table, targets

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "machine"))

from guestbuild import engine_unavailable  # noqa: E402

TOOLS = [t for t in ("gcc", "ld") if shutil.which(t) is None]
KVM = engine_unavailable("kvm") is None
ENGINES = ((["trap", "bt", "pv", "kvm"] if KVM else []) + ["emu"]
           + (["qemu"] if shutil.which("qemu-system-x86_64") else []) + ["native"])


@pytest.mark.skipif(bool(TOOLS) or engine_unavailable("emu") is not None,
                    reason=f"missing {TOOLS} or the emu engine")
def test_bench_modes_prints_the_table_and_writes_the_chart(tmp_path: Path) -> None:
    stem = tmp_path / "chart"
    argv = [sys.executable, "-m", "pyhv", "bench", "modes", "--engines", ",".join(ENGINES),
            "--loops", "pt,cpu", "--repeat", "1", "--scale", "0.00001", "--chart",
            str(stem), "--timeout", "30"]
    p = subprocess.run(argv, capture_output=True, text=True, timeout=240,
                       stdin=subprocess.DEVNULL)
    assert p.returncode == 0, p.stderr
    out = p.stdout
    assert "reproduce: pyhv bench modes --engines " + ",".join(ENGINES) in out
    header = next(ln for ln in out.splitlines() if ln.startswith("loop "))
    assert header.split()[1:] == ENGINES
    cost = re.compile(r"^-?[0-9.]+$")
    for loop, expect in (("pt", [e for e in ENGINES if e != "native"]), ("cpu", ENGINES)):
        row = next(ln for ln in out.splitlines() if ln.startswith(f"{loop} ") and "per op" in ln)
        cells = re.findall(r"(-?[0-9.]+) (?:ms|us|ns)|(-)(?=\s|$)|(failed)", row.split("per op")[1])
        assert len(cells) == len(ENGINES), row
        for e, (num, dash, failed) in zip(ENGINES, cells, strict=True):
            assert not failed, f"{loop} on {e} failed:\n{out}"
            assert (num and cost.match(num)) if e in expect else dash, (e, row)
    assert "targets (issue 13):" in out
    png, svg = stem.with_suffix(".png"), stem.with_suffix(".svg")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image
    assert matplotlib.image.imread(png).shape[0] > 100
    assert ET.parse(svg).getroot().tag.endswith("svg")


def test_targets_are_judged_from_the_measured_numbers() -> None:
    res = Results(cost={("priv", "trap"): 100e-6, ("priv", "bt"): 40e-6,
                        ("pt", "bt"): 50e-6, ("pt", "pv"): 5e-6,
                        ("cpu", "trap"): 1.0e-9, ("cpu", "bt"): 1.05e-9})
    got = dict(targets(res))
    assert got["bt >= 10x faster than trap on priv"] == "NOT met: 2.50x"
    assert got["pv faster than bt on pt"] == "met: pv 10.0x faster"
    assert got["bt's cpu within 10% of trap's"] == "met: bt/trap 1.050"
    res.cost[("cpu", "bt")] = 1.2e-9
    res.cost[("priv", "bt")] = 5e-6
    del res.cost[("pt", "pv")]
    got = dict(targets(res))
    assert got["bt >= 10x faster than trap on priv"] == "met: 20.00x"
    assert got["pv faster than bt on pt"] == "not measured"
    assert got["bt's cpu within 10% of trap's"] == "NOT met: bt/trap 1.200"


def test_a_failed_pair_is_reported_with_its_reason() -> None:
    res = Results(cost={("sys", "trap"): 2e-4}, failed={("sys", "kvm"): "KVM internal error"})
    text = table(res, ["trap", "kvm"])
    row = next(ln for ln in text.splitlines() if ln.startswith("sys "))
    assert row.split()[-1] == "failed"
    assert "sys on kvm: KVM internal error" in text
