"""Benchmark: snapshot create and restore-to-running, pyhv (emu) against QEMU's TCG
savevm/loadvm, for 128 MiB and 1 GiB Linux guests, in one run.

    .venv/bin/python bench/snapshot_bench.py [--runs 3] [--sizes 128,1024]

Both boot the same kernel and initramfs (pyhv's cached image: `pyhv guest path linux`)
to its shell, with one qcow2 disk (QEMU's savevm needs one to hold the VM state; pyhv
takes the disk's internal snapshot), and idle there. Then, per size, the medians of
--runs:

    pyhv create     PUT /snapshot/create on the VM's control API (pause, vmstate, the
                    sparse RAM file, the disk's internal snapshot, manifest, resume):
                    host wall time of the request
    qemu savevm     HMP `savevm sN` on a unix-socket monitor: wall time to the prompt
    pyhv revert     PUT /snapshot/revert s0 on the running VM (RAM copied back in)
    qemu loadvm     HMP `loadvm s0` (the VM keeps running): wall time to the prompt
    pyhv, no disk   create and the warm restore of a second pyhv VM without the disk
                    (no qcow2 internal snapshot to take or apply: the issue's 20 ms
                    restore-to-running goal is about this path; QEMU cannot savevm
                    without a disk)
    pyhv restore    `pyhv run --restore`'s path in a fresh process, timed inside it from
                    the first snapshot check to the moment the run loop starts the vCPU
                    (every check including the full RAM checksum, `--verify`; the
                    RAM mapped from the file copy-on-write), and the same with the
                    default quick RAM check (size + sparse map, what `pyhv run
                    --restore` does); Python's start-up is not in it; and that again
                    in a process that has built one machine before and imported the
                    disk code (pyhv's and unicorn's code loaded, as a VMM serving a
                    restore request is; this host sets PYTHONDONTWRITEBYTECODE, so a
                    cold import compiles the modules)

Ratios are pyhv / QEMU (below 1: pyhv faster). Every process and wait has a timeout.
These machines are shared and noisy (docs/host.md): quote ratios from one run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from pyhv import images  # noqa: E402
from pyhv.disk.qcow2.create import create as create_qcow2  # noqa: E402
from pyhv.vmclient import call  # noqa: E402

PROMPT = b"pyhv:/# "
CMDLINE = "console=ttyS0 tsc=unstable"
BOOT_TIMEOUT_S = 240
OP_TIMEOUT_S = 300
DISK = 64 << 20


def wait_for(cond: Callable[[], bool], what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise RuntimeError(f"gave up waiting for {what}")
        time.sleep(0.05)


# ---------------------------------------------------------------------- pyhv

def pyhv_side(mib: int, runs: int, work: Path, with_disk: bool = True) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "PYHV_RUN_DIR": str(work / "run"),
           "PYHV_SNAPSHOT_DIR": str(work / "snaps")}
    disk = work / f"pyhv-{mib}.qcow2"
    create_qcow2(str(disk), DISK)
    out = work / f"pyhv-{mib}-{with_disk}.out"
    name = f"b{mib}{'d' if with_disk else 'n'}"
    with out.open("wb") as o:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pyhv", "run", "--engine", "emu", "--mem", f"{mib}M",
             "--append", CMDLINE, *(["--disk", str(disk)] if with_disk else []),
             "--name", name,
             "--timeout", str(BOOT_TIMEOUT_S + 4 * OP_TIMEOUT_S)],
            stdin=subprocess.PIPE, stdout=o, stderr=subprocess.DEVNULL, env=env)
    sock = work / "run" / f"{name}.sock"
    res: dict[str, float] = {}
    try:
        wait_for(lambda: PROMPT in out.read_bytes() or proc.poll() is not None,
                 f"pyhv {mib} MiB shell", BOOT_TIMEOUT_S)
        creates, reverts, stored = [], [], []
        for i in range(runs):
            t = time.perf_counter()
            r = call(sock, "PUT", "/snapshot/create", {"name": f"s{i}"}, timeout=OP_TIMEOUT_S)
            creates.append(time.perf_counter() - t)
            stored.append(r["ram_bytes_stored"] / (1 << 20))
        for _ in range(runs):
            t = time.perf_counter()
            call(sock, "PUT", "/snapshot/revert", {"name": "s0"}, timeout=OP_TIMEOUT_S)
            reverts.append(time.perf_counter() - t)
        call(sock, "PUT", "/actions", {"action": "stop"})
        proc.wait(timeout=60)
        res["create"] = statistics.median(creates)
        res["revert"] = statistics.median(reverts)
        res["stored_mib"] = statistics.median(stored)
        snapdir = work / "snaps" / name / "s0"
        probes = ((("restore", "full", False), ("restore_noverify", "quick", False),
                   ("restore_warm", "quick", True)) if with_disk else
                  (("restore_warm", "quick", True),))
        for key, ram, warm in probes:
            times = [restore_probe(snapdir, ram, env, warm) for _ in range(runs)]
            res[key] = statistics.median(times)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    return res


def restore_probe(snapdir: Path, ram: str, env: dict[str, str], warm: bool = False
                  ) -> float:
    """Seconds from the first check of `snapdir` to the vCPU's start, in a new process
    (warm: after one throwaway machine was built, so pyhv's and unicorn's code is
    loaded, as in a VMM process that restores on request)."""
    code = f"""
import sys, time, json
from pathlib import Path
from pyhv.machine import Machine, MachineConfig, StopRequest
from pyhv.runner import Runner
from pyhv.snapshot.ops import open_snapshot, restore_machine
from pyhv.snapshot.manifest import RAM
from pyhv.cmd_restore import pci_devices
snapdir = Path({str(snapdir)!r})
if {warm!r}:   # a VMM process whose code is loaded: build and drop one machine first
    from pyhv.arch.x86 import boot
    from pyhv.loader import LoadedGuest
    def setup(mem):
        mem.write(0x7C00, bytes([0xEB, 0xFE]))
        return LoadedGuest("warm", boot.real_mode(0, 0x7C00), "warm-up")
    Machine(MachineConfig(engine="emu", mem_size=4 << 20, setup=setup),
            lambda b: None).close()
    import pyhv.disk.open, pyhv.disk.qcow2.check, pyhv.disk.qcow2.snapshot
    import pyhv.disk.qcow2.rewrite, pyhv.disk.qcow2.create
t0 = time.perf_counter()
m, state = open_snapshot(snapdir, ram={ram!r})
cfg = MachineConfig(mem_size=m.mem_size, n_cpus=m.cpus, engine=m.engine,
                    restore_ram=snapdir / RAM, pci_devices=pci_devices(m.machine.get("pci", [])))
machine = Machine(cfg, lambda b: None)
restore_machine(machine, m, state)
runner = Runner(machine, timeout=0.5)
t1 = time.perf_counter()
runner.run()
machine.close()
print(json.dumps(t1 - t0))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=OP_TIMEOUT_S, env=env, stdin=subprocess.DEVNULL)
    if r.returncode != 0:
        raise RuntimeError(f"restore probe failed: {r.stderr[-2000:]}")
    return float(json.loads(r.stdout.strip().splitlines()[-1]))


# ---------------------------------------------------------------------- QEMU

class Hmp:
    def __init__(self, path: Path) -> None:
        self.s = socket.socket(socket.AF_UNIX)
        self.s.settimeout(OP_TIMEOUT_S)
        self.s.connect(str(path))
        self._until(b"(qemu) ")

    def _until(self, marker: bytes) -> bytes:
        data = b""
        while not data.endswith(marker):
            chunk = self.s.recv(65536)
            if not chunk:
                raise RuntimeError(f"the QEMU monitor closed: {data[-500:]!r}")
            data += chunk
        return data

    def cmd(self, text: str) -> tuple[float, bytes]:
        t = time.perf_counter()
        self.s.sendall(text.encode() + b"\n")
        out = self._until(b"(qemu) ")
        return time.perf_counter() - t, out


def qemu_side(mib: int, runs: int, work: Path, qemu: str) -> dict[str, float]:
    img = images.ensure_linux_image(quiet=True)
    disk = work / f"qemu-{mib}.qcow2"
    create_qcow2(str(disk), DISK)
    out = work / f"qemu-{mib}.out"
    mon = work / f"qemu-{mib}.mon"
    proc = subprocess.Popen(
        [qemu, "-accel", "tcg", "-M", "pc", "-m", str(mib), "-display", "none",
         "-no-reboot", "-serial", f"file:{out}", "-monitor", f"unix:{mon},server,nowait",
         "-kernel", str(img.kernel_path), "-initrd", str(img.initrd_path),
         "-append", CMDLINE, "-drive", f"file={disk},if=virtio,format=qcow2",
         "-nic", "none"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    res: dict[str, float] = {}
    try:
        wait_for(lambda: out.exists() and PROMPT in out.read_bytes() or proc.poll() is not None,
                 f"QEMU {mib} MiB shell", BOOT_TIMEOUT_S)
        if proc.poll() is not None:
            raise RuntimeError(f"QEMU exited: {proc.stderr.read().decode()[-1000:]}"
                               if proc.stderr else "QEMU exited")
        hmp = Hmp(mon)
        saves = [hmp.cmd(f"savevm s{i}")[0] for i in range(runs)]
        loads = []
        for _ in range(runs):
            t, text = hmp.cmd("loadvm s0")
            if b"rror" in text:
                raise RuntimeError(f"loadvm failed: {text!r}")
            loads.append(t)
        hmp.s.sendall(b"quit\n")
        proc.wait(timeout=60)
        res["create"] = statistics.median(saves)
        res["restore"] = statistics.median(loads)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--sizes", default="128,1024", help="guest RAM sizes in MiB")
    args = ap.parse_args()
    qemu = shutil.which("qemu-system-x86_64")
    print(f"snapshot_bench: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {platform.node()}, "
          f"{os.cpu_count()} CPUs; median of {args.runs}; "
          f"command: {' '.join([Path(sys.argv[0]).name, *sys.argv[1:]])}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="pyhv-snapbench-") as tmp:
        work = Path(tmp)
        for mib in (int(x) for x in args.sizes.split(",")):
            p = pyhv_side(mib, args.runs, work)
            n = pyhv_side(mib, args.runs, work, with_disk=False)
            q = qemu_side(mib, args.runs, work, qemu) if qemu else {}
            rows.append((mib, p, n, q))
            for f in work.glob("*.qcow2"):
                f.unlink()
            shutil.rmtree(work / "snaps", ignore_errors=True)
    print(f"\n{'guest':>8} {'measure':<34} {'pyhv':>10} {'QEMU':>10} {'pyhv/QEMU':>10}")
    for mib, p, n, q in rows:
        for what, pv, qv in (
                ("create (savevm)", p["create"], q.get("create")),
                ("revert a running VM (loadvm)", p["revert"], q.get("restore")),
                ("restore-to-running, --verify", p["restore"], q.get("restore")),
                ("restore-to-running (quick check)", p["restore_noverify"], q.get("restore")),
                ("  the same, code already loaded", p["restore_warm"], q.get("restore")),
                ("(pyhv, no disk) create", n["create"], None),
                ("(pyhv, no disk) restore, code loaded", n["restore_warm"], None)):
            ratio = f"{pv / qv:.2f}x" if qv else "-"
            qs = f"{qv * 1000:.1f} ms" if qv else "-"
            print(f"{mib:>5} MiB {what:<34} {pv * 1000:>7.1f} ms {qs:>10} {ratio:>10}")
        print(f"{'':>8} RAM stored by pyhv: {p['stored_mib']:.1f} MiB of {mib} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
