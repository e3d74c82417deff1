"""Several emu vCPUs in one process share the interposed TB-start helper
(engines/emu/native/blockhook.c): each counts its own blocks, a closed vCPU's slot is
reused, and every count equals the block hook's (PYHV_EMU_TB_HELPER=0).

The script runs in a fresh interpreter (pyhv's native code must be loaded before
unicorn; pytest may have imported unicorn already) through the engine interface: vCPUs
A, B, C run real-mode loops of different lengths, B is closed, D takes its slot, A runs
again. Also: a stop requested from another thread (`kick`) ends a guest spinning in a
one-block loop on either path.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

SCRIPT = r"""
import json, threading, time
from pyhv.arch.x86.cpustate import CpuState, Segment
from pyhv.engines.emu import EmuEngine
from pyhv.exits import Halt, Interrupted
from pyhv.memory import GuestMemory

def make(n):
    mem = GuestMemory.with_layout([(0, 1 << 20)])
    # mov cx, n; 1: dec cx; jnz 1b; hlt  (real mode, IF=0: HLT ends the run)
    mem.write(0x1000, bytes([0xb9, n & 0xff, n >> 8, 0x49, 0x75, 0xfd, 0xf4]))
    engine = EmuEngine(mem)
    vcpu = engine.create_vcpu(0)
    st = CpuState(rip=0x1000)
    st.cs = Segment.real_mode(0, code=True)
    st.ds = st.es = st.fs = st.gs = st.ss = Segment.real_mode(0)
    vcpu.set_state(st)
    return engine, vcpu, st

def run(vcpu):
    ex = vcpu.run()
    assert isinstance(ex, Halt) and not ex.interrupts_enabled, ex
    return vcpu.stats()["blocks executed"]

out = {}
a, b, c = make(1000), make(2000), make(3000)
out["A"], out["B"], out["C"] = run(a[1]), run(b[1]), run(c[1])
b[0].close()
d = make(500)
out["D"] = run(d[1])
a[1].set_state(a[2])
out["A again"] = run(a[1])
out["helper"] = [v[1].tb_counter for v in (a, c, d)]
for e in (a, c, d):
    e[0].close()

mem = GuestMemory.with_layout([(0, 1 << 20)])
mem.write(0x1000, bytes([0xeb, 0xfe]))          # 1: jmp 1b
engine = EmuEngine(mem)
vcpu = engine.create_vcpu(0)
st = CpuState(rip=0x1000)
st.cs = Segment.real_mode(0, code=True)
vcpu.set_state(st)
threading.Timer(0.2, vcpu.kick).start()
t0 = time.monotonic()
ex = vcpu.run()
out["kick"] = [type(ex).__name__, time.monotonic() - t0 < 10, vcpu.stats()["blocks executed"] > 0]
print(json.dumps(out))
"""


def run_script(helper: bool) -> dict[str, object]:
    env = dict(os.environ)
    for k in ("PYHV_EMU_TB_HELPER", "PYHV_EMU_NATIVE", "PYHV_EMU_EXIT_CHECKS"):
        env.pop(k, None)
    if not helper:
        env["PYHV_EMU_TB_HELPER"] = "0"
    p = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                       timeout=120, env=env, stdin=subprocess.DEVNULL)
    assert p.returncode == 0, p.stderr
    result: dict[str, object] = json.loads(p.stdout)
    return result


def test_vcpus_count_their_own_blocks_like_the_block_hook() -> None:
    fast, hook = run_script(True), run_script(False)
    assert fast.pop("helper") == [True, True, True]
    assert hook.pop("helper") == [False, False, False]
    assert fast == hook, (fast, hook)
    assert fast["kick"] == ["Interrupted", True, True]
    counts = [fast[k] for k in ("D", "A", "B", "C")]
    assert counts == sorted(counts) and len(set(map(str, counts))) == 4, counts
    assert fast["A again"] == 2 * fast["A"]    # (the count is per vCPU, cumulative)
