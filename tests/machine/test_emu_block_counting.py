"""The emu engine counts translated blocks in unicorn's TB-start helper exactly as its
block hook did (engines/emu/native/blockhook.c), through the real `pyhv run`.

Guest time on emu is a function of the blocks executed, so the two ways of counting
must agree to the block: the same guest output, the same number of blocks, the same
number of interrupts delivered at the same guest time. `PYHV_EMU_TB_HELPER=0` selects
the block hook. A guest that spins (`pi`), one woken by PIT interrupts from HLT (`pit`:
timer deadlines end slices, an interrupt window is watched with IF=0), and one in long
mode with exceptions (`faults64`). And when unicorn was imported before pyhv, the engine
cannot take the helper over: it says so and counts with the hook, with the same result.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
from guestbuild import GuestBuilder, engine_unavailable

pytestmark = pytest.mark.skipif(engine_unavailable("emu") is not None,
                                reason=str(engine_unavailable("emu")))

STATS = ("blocks executed", "interrupts", "exceptions",
         "blocks counted in unicorn's TB-start helper")


def run(guests: GuestBuilder, guest: str, helper: bool | None,
        prelude: str | None = None) -> tuple[int, str, dict[str, str]]:
    """(status, stdout, the --stats values that matter) of `pyhv run --engine emu`."""
    env = dict(os.environ)
    for k in ("PYHV_EMU_TB_HELPER", "PYHV_EMU_NATIVE", "PYHV_EMU_EXIT_CHECKS"):
        env.pop(k, None)
    if helper is False:
        env["PYHV_EMU_TB_HELPER"] = "0"
    args = ["run", "--engine", "emu", "--kernel", str(guests(guest)), "--stats",
            "--timeout", "20"]
    if prelude is None:
        argv = [sys.executable, "-m", "pyhv", *args]
    else:
        argv = [sys.executable, "-c",
                f"{prelude}\nimport sys, runpy\nsys.argv = ['pyhv', *{args!r}]\n"
                "runpy.run_module('pyhv', run_name='__main__')"]
    p = subprocess.run(argv, capture_output=True, text=True, timeout=60, env=env,
                       stdin=subprocess.DEVNULL)
    assert "Traceback" not in p.stderr, p.stderr
    got = {k: m.group(1) for k in STATS
           if (m := re.search(rf"emu: {re.escape(k)}\s*\S\s*(\d+)", p.stderr))}
    guest_time = re.search(r"guest time at the end\s*\S\s*([0-9.]+ s)", p.stderr)
    if guest_time:
        got["guest time"] = guest_time.group(1)
    return p.returncode, p.stdout, got


@pytest.mark.parametrize("guest", ["pi", "pit", "faults64"])
def test_helper_and_block_hook_count_the_same_blocks(guests: GuestBuilder, guest: str
                                                     ) -> None:
    s1, out1, fast = run(guests, guest, None)
    s0, out0, hook = run(guests, guest, False)
    assert fast.pop("blocks counted in unicorn's TB-start helper") == "1", fast
    assert hook.pop("blocks counted in unicorn's TB-start helper") == "0", hook
    assert (s1, out1) == (s0, out0)
    assert s1 % 2 == 1 and out1          # the guest's own debug-exit, its own output
    assert fast == hook and int(fast["blocks executed"]) > 0, (fast, hook)


def test_unicorn_imported_first_means_the_block_hook(guests: GuestBuilder) -> None:
    status, out, got = run(guests, "pit", None, prelude="import unicorn")
    assert got["blocks counted in unicorn's TB-start helper"] == "0", got
    assert (status, out, got) == run(guests, "pit", False)


def test_the_default_engine_path_takes_the_helper_over(guests: GuestBuilder) -> None:
    """`pyhv run` without --engine asks pyhv.host which engine to use; that must not
    import unicorn before pyhv's native code is loaded."""
    from pyhv.host import probe_host
    if probe_host().default_engine != "emu":
        pytest.skip("the default engine here is not emu")
    p = subprocess.run([sys.executable, "-m", "pyhv", "run", "--kernel", str(guests("pi")),
                        "--stats", "--timeout", "20"], capture_output=True, text=True,
                       timeout=60, stdin=subprocess.DEVNULL)
    assert re.search(r"emu: blocks counted in unicorn's TB-start helper\s*\S\s*1\b",
                     p.stderr), p.stderr
