"""`pyhv run`: boot a guest and attach its serial console.

With `--kernel`, any image the loaders know (flat, multiboot, ELF64, Linux bzImage or
vmlinux). Without it, Debian's Linux kernel and pyhv's busybox initramfs from the image
cache (`pyhv guest fetch linux`, run on demand): the main job, a Linux shell on the
console. `--command CMD` runs CMD in that Linux instead of a shell, prints its output and
exits with its status. `--image debian` boots the same kernel with the Debian root disk
(pyhv.debian) as the first virtio-blk disk, /dev/vda, through a throwaway overlay
(pyhv.overlay) removed when the run ends, and `pyhv.root=/dev/vda` on the command line.

Flow: parse and check every option, build the Machine (which validates the image before
any guest code runs), attach the terminal, run until the guest ends, report. The
terminal is restored and the machine closed on every path. A guest reset restarts the
machine with a fresh copy of the kernel unless `--on-reboot exit`; RESET_LOOP_LIMIT
resets in a row, each within RESET_LOOP_WINDOW_S of its start, are a reset loop, which
ends the run with status 4.

Output: the console's bytes go to stdout through an `OutputPump` (pyhv.outflow), so a
slow or absent reader never blocks the run loop; output that cannot be buffered is
dropped, with one warning and a count at the end. A closed stdout (`| head -c 10`) ends
the run quietly with status 141, as a tool killed by SIGPIPE.

Console socket: `--console-sock PATH` (pyhv.consolesock) also serves the serial console
on a UNIX socket, output to every client and their bytes as input, for the host daemon.

Control: `--name NAME` claims NAME in the run directory (pyhv.rundir) and `--api-sock`
(or the name's socket) serves the control API (pyhv.vmapi) from a thread until the run
ends; each machine of the run (a reset builds a new one) is attached to the VmControl
while it runs. A hard stop from the API ends the run with status 0 ("destroy").

CPU scheduling (pyhv.sched, docs/sched.md): `--cpu-shares/--cpu-reservation/--cpu-limit`
admit the VM against the other VMs of the host's pyhv cgroup and move this process into
its own cgroup for the run (removed at the end); `--pin` pins each vCPU's host thread.

Statuses: see pyhv.runner; bad options and images give 2 with one `pyhv:` line; an
internal error (a pyhv bug) 70, with one line and the traceback in a log file (or on
stderr with --debug).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from pyhv import runner as R
from pyhv.console import Console
from pyhv.devices.deferred import DeferredCalls
from pyhv.devices.pci.function import PciFunction
from pyhv.devices.serial16550 import IER_RDA
from pyhv.errors import ConfigError
from pyhv.exitmarker import ExitMarker
from pyhv.loader import FORMATS
from pyhv.machine import Machine, MachineConfig, StopRequest, check_memory, resolve_engine
from pyhv.memory import GuestMemory
from pyhv.outflow import OutputPump
from pyhv.overlay import Overlay, disk_option
from pyhv.terminal import ESCAPE_NAME, InputGate, Terminal
from pyhv.units import parse_size
from pyhv.vmcontrol import VmControl

if TYPE_CHECKING:
    from pyhv import images
    from pyhv.consolesock import ConsoleSocket
    from pyhv.migration import Incoming
    from pyhv.sched import Pinner

# Kernel command-line words pyhv adds for its own Linux, per engine, each with its reason
# (README "Linux workarounds" repeats this table). emu needs none where its interposed
# CPU helpers run (the TSC is then constant-rate on the virtual clock, docs/emu.md);
# `linux_workarounds` says which apply on this host.
HOST_TSC_WORKAROUNDS: list[tuple[str, str]] = [
    ("tsc=unstable", "without pyhv's native CPU helpers the software CPU's TSC is the "
     "host's, not constant-rate on guest time, so Linux must not use it as its "
     "clocksource"),
    ("no_timer_check", "Linux checks the I/O APIC timer route by waiting a fixed number "
     "of TSC cycles for 4 ticks; with the host's TSC and the PIT on virtual time the wait "
     "ends too early in guest time and Linux wrongly reports the route broken "
     "(\"MP-BIOS bug: 8254 timer not connected\")")]
LINUX_WORKAROUNDS: dict[str, list[tuple[str, str]]] = {
    "emu": HOST_TSC_WORKAROUNDS,
    "kvm": [],
}


def linux_workarounds(engine: str) -> list[tuple[str, str]]:
    """The workarounds `engine` needs on this host: emu's apply only when its TSC is the
    host's (no native code, or the helpers' start-up check failed)."""
    if engine == "emu":
        from pyhv.engines.emu import _uc  # noqa: F401 - binds the helpers first
        from pyhv.engines.emu.native import cpuhooks
        if cpuhooks.available()[0]:
            return []
    return LINUX_WORKAROUNDS.get(engine, [])


IMAGES = ("linux", "debian")
RESET_LOOP_LIMIT = 20        # resets in a row, each soon after its start: a reset loop
RESET_LOOP_WINDOW_S = 10.0   # a run shorter than this before its reset is "soon"
STATUS_OUTPUT_CLOSED = 128 + signal.SIGPIPE   # 141: what a shell reports for SIGPIPE


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kernel", type=Path, metavar="IMG",
                   help="kernel image (default: Debian's Linux from pyhv's image cache)")
    p.add_argument("--image", choices=IMAGES, default=None,
                   help="pyhv's cached guest (instead of --kernel): linux (the default: "
                        "Debian's kernel + pyhv's busybox initramfs) or debian (the same, "
                        "with a Debian root disk as /dev/vda: apt, bc, python3; `pyhv "
                        "guest fetch debian`; the guest writes to a throwaway overlay)")
    p.add_argument("--initrd", type=Path, metavar="FILE",
                   help="initial ramdisk (Linux) or module 0 (multiboot)")
    p.add_argument("--append", default=None, metavar="CMDLINE",
                   help="kernel command line (with pyhv's Linux image it replaces pyhv's, "
                        "but the engine's workarounds are kept: on emu tsc=unstable and "
                        "no_timer_check, unless CMDLINE sets those keys itself)")
    p.add_argument("--format", choices=FORMATS, default="auto",
                   help="image format (default: detected from the content)")
    p.add_argument("--load-addr", type=lambda s: int(s, 0), default=None, metavar="ADDR",
                   help="flat images: guest-physical load address (default 0x7c00)")
    p.add_argument("--mem", default="128M", metavar="SIZE",
                   help="guest RAM, e.g. 64M, 1G (a plain number is MiB; default 128M)")
    p.add_argument("--cpus", type=int, default=1, metavar="N",
                   help="vCPUs, 1 to 16 (default 1); several on emu (round robin on one "
                        "thread) or kvm (a thread each); the APs wait for the guest's "
                        "INIT/SIPI, as on a PC")
    p.add_argument("--engine", default="auto", metavar="{auto,kvm,emu,trap,bt,pv}",
                   help="how guest code runs (default auto: kvm with VT-x/AMD-V, else emu; "
                        "trap: trap-and-emulate of a 64-bit kernel at CPL 3 on /dev/kvm; "
                        "bt: binary translation of that kernel, run at CPL 3 on /dev/kvm; "
                        "pv: a kernel using pyhv's hypercall ABI, on the trap monitor)")
    p.add_argument("--engine-opt", action="append", default=[], metavar="NAME=VALUE",
                   help="an option of the chosen engine, checked by it (repeatable). "
                        "trap: umip=on|off, CR4.UMIP for the deprivileged kernel: "
                        "SGDT/SIDT/SLDT/STR/SMSW trap and are emulated with its own "
                        "values (needs a CPU with UMIP; default off: they show the "
                        "monitor's). bt: tc=SIZE, the translation cache (64K..64M, "
                        "default 4M); bt: trace=off|FILE, each translated block next to "
                        "its translation (as --trace-bt). kvm, emu and pv take none")
    p.add_argument("--trace-bt", nargs="?", const="-", default=None, metavar="FILE",
                   help="bt: print each guest block next to its translation as it is "
                        "translated (to stderr, or FILE)")
    p.add_argument("--disk", action="append", default=[],
                   metavar="PATH[,format=raw|qcow2][,readonly=on][,serial=S]",
                   help="a virtio-blk disk backed by a raw or qcow2 image (repeatable: "
                        "vda, vdb, ... in order); locked against other writers")
    p.add_argument("--rng", action="store_true",
                   help="a virtio-rng device fed by the host's getrandom (the guest's "
                        "entropy pool is ready early)")
    p.add_argument("--net", default=None, metavar="user|tap=NAME|socket=...|none",
                   help="a virtio-net NIC on a network back end: user (passt: DHCP, DNS, "
                        "the gateway address reaches the host), tap=NAME, "
                        "socket=listen:ADDR, socket=connect:ADDR, socket=udp:LOCAL@REMOTE "
                        "(ADDR: HOST:PORT or a Unix socket path; docs/net.md)")
    p.add_argument("--mac", default=None, metavar="MAC",
                   help="the NIC's MAC address (default 52:54:00 and 3 random octets)")
    p.add_argument("--timeout", type=float, default=None, metavar="S",
                   help="end the guest after S seconds (exit status 124)")
    p.add_argument("--stats", action="store_true",
                   help="print exits by reason and time in guest vs pyhv at the end")
    p.add_argument("--strict-io", action="store_true",
                   help="an access to a port or address with no device ends the run")
    p.add_argument("--command", default=None, metavar="CMD",
                   help="Linux: run CMD in the guest's shell, print its output, exit "
                        "with its status")
    p.add_argument("--on-reboot", choices=("restart", "exit"), default="restart",
                   help="what a guest reboot does (default restart)")
    p.add_argument("--name", default=None, metavar="NAME",
                   help="name the VM: its control API socket is NAME.sock in the per-user "
                        "run directory ($XDG_RUNTIME_DIR/pyhv, ...; docs/api.md), so "
                        "`pyhv list/info/suspend/resume/shutdown/destroy NAME` reach it; "
                        "a name a live VM holds is refused")
    p.add_argument("--api-sock", type=Path, default=None, metavar="PATH",
                   help="serve the VM's control API (HTTP/JSON, docs/api.md) on this UNIX "
                        "socket (mode 0600; with --name, instead of the run directory's)")
    p.add_argument("--cpu-shares", default=None, metavar="N|low|normal|high",
                   help="CPU shares against other VMs under contention (2..262144; ESX's "
                        "low/normal/high = 500/1000/2000 per vCPU; default normal); needs a "
                        "writable cgroup CPU controller (docs/sched.md)")
    p.add_argument("--cpu-reservation", default=None, metavar="PCT",
                   help="CPU guaranteed under contention, in percent of one CPU (admission "
                        "control refuses the VM if the host's reservations would not fit)")
    p.add_argument("--cpu-limit", default=None, metavar="PCT",
                   help="most CPU the VM may use, in percent of one CPU (e.g. 25)")
    p.add_argument("--pin", action="append", default=[], metavar="CPUS|VCPU=CPUS",
                   help="pin vCPU threads: CPUS (e.g. 0 or 0-1) for every vCPU, or "
                        "VCPU=CPUS for each vCPU (repeatable); on emu all vCPUs share one "
                        "thread, pinned to the union")
    p.add_argument("--console-sock", type=Path, default=None, metavar="PATH",
                   help="also serve the serial console on this UNIX socket (mode 0600): "
                        "each client gets the output from then on and its bytes are the "
                        "console's input (how `pyhv host serve` reaches its VMs' consoles)")
    p.add_argument("--restore", type=Path, default=None, metavar="DIR",
                   help="continue the VM saved in snapshot directory DIR (pyhv "
                        "snapshot-create) exactly where it was: its RAM is mapped from "
                        "the snapshot copy-on-write; --engine may name another engine "
                        "that can run the saved CPU mode (docs/snapshots.md)")
    p.add_argument("--verify", action="store_true",
                   help="with --restore: hash the whole RAM file first (by default a "
                        "quick check of its size and sparse map; docs/snapshots.md)")
    p.add_argument("--snapshot-dir", type=Path, default=None, metavar="DIR",
                   help="where this VM's snapshots go (default: $PYHV_SNAPSHOT_DIR/VM, "
                        "else ~/.local/share/pyhv/snapshots/VM; VM: the --name, or the "
                        "socket's name)")
    p.add_argument("--incoming", default=None, metavar="tcp:ADDR:PORT",
                   help="receive a live migration (pyhv migrate) on this address, then "
                        "run the VM it brings (PORT 0: any free port, printed); give the "
                        "source's machine options (docs/migration.md)")
    p.add_argument("--mem-limit", default=None, metavar="SIZE",
                   help="most host memory the VM process may use (guest RAM it touched + "
                        "pyhv), e.g. 512M: a memory cgroup; over it the kernel reclaims, "
                        "then ends this VM only")
    p.add_argument("--balloon", action="store_true",
                   help="a virtio-balloon device: the control API's PUT /balloon asks the "
                        "guest to hand memory back, which pyhv returns to the host "
                        "(GET /balloon: the guest's view and the host's RSS)")
    p.add_argument("--ksm", action="store_true",
                   help="let the host's KSM merge identical guest pages (MADV_MERGEABLE "
                        "on guest RAM); the pages merged are reported at the end (ksmd "
                        "itself is the host's to turn on)")
    p.add_argument("--debug", action="store_true",
                   help="on an internal error (a pyhv bug), print the traceback instead "
                        "of writing it to a log file")


def _stderr(text: str) -> None:
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


def _output_pump() -> OutputPump:
    def dropping() -> None:
        _stderr("pyhv: stdout is not reading the guest's console output fast enough: "
                "dropping output (the count follows at the end)")

    def failed(e: OSError) -> None:
        _stderr(f"pyhv: cannot write the guest's console output: {e.strerror or e}; "
                "dropping it")
    return OutputPump(sys.stdout.fileno(), on_drop=dropping, on_error=failed)


def main(args: argparse.Namespace) -> int:
    overlays: list[Overlay] = []      # --image debian's throwaway disk, removed at the end
    with contextlib.ExitStack() as stack:   # the control API, closed when the run ends
        try:
            return _main(args, overlays, stack)
        finally:
            for overlay in overlays:
                overlay.close()


def _snapshot_dir(args: argparse.Namespace) -> Path | None:
    """The VM's snapshot directory, if it has a control API (else None)."""
    if args.name is None and args.api_sock is None:
        return None
    from pyhv.snapshot import SnapshotStore
    return SnapshotStore.for_vm(args.name or Path(args.api_sock).stem, args.snapshot_dir).dir


def _start_control(args: argparse.Namespace, stack: contextlib.ExitStack
                   ) -> VmControl | None:
    """--name / --api-sock: claim the name, serve the control API until the run ends."""
    if args.name is None and args.api_sock is None:
        return None
    from pyhv import rundir
    from pyhv.snapshot import SnapshotStore
    from pyhv.vmapi import ApiServer
    sock = args.api_sock
    if args.name is not None:
        claim = rundir.claim(args.name)
        stack.callback(claim.release)
        sock = sock or claim.sock
    assert sock is not None
    store = SnapshotStore.for_vm(args.name or Path(sock).stem, args.snapshot_dir)
    control = VmControl(args.name, str(sock), snapshots=store)
    stack.callback(control.end)
    server = ApiServer(sock, control)
    stack.callback(server.close)
    return control


def _main(args: argparse.Namespace, overlays: list[Overlay],
          stack: contextlib.ExitStack) -> int:
    if args.verify and args.restore is None:
        raise ConfigError("--verify checks a snapshot: it goes with --restore DIR")
    if args.restore is not None:
        from pyhv.cmd_restore import restore_config
        config, prepare, snapshot, restored_pci = restore_config(args)
        return _run(args, config, None, stack, prepare, snapshot, restored_pci)
    mem = parse_size(args.mem, default_unit="M")
    check_memory(mem)
    if args.timeout is not None and not args.timeout > 0:
        raise ConfigError(f"--timeout must be a positive number of seconds (got {args.timeout})")
    from pyhv.engines import ENGINES, engine_class
    if args.engine != "auto" and args.engine not in ENGINES:
        raise ConfigError(f"unknown engine {args.engine!r} (choose from auto, "
                          f"{', '.join(ENGINES)})")
    engine = resolve_engine(args.engine)
    from pyhv.diskspec import make_function, parse_disk
    disks = [parse_disk(d) for d in args.disk]
    from pyhv.net.spec import parse_mac, parse_net
    from pyhv.nic import DHCP_WORD, make_nic, wants_dhcp
    net = parse_net(args.net or "none")
    mac = parse_mac(args.mac)
    if net.kind == "none" and args.mac is not None:
        raise ConfigError("--mac needs a NIC: add --net")
    engine_options = _engine_options(args.engine_opt)
    if args.trace_bt is not None:
        if engine != "bt":
            raise ConfigError("--trace-bt needs --engine bt")
        engine_options.setdefault("trace", args.trace_bt)
    engine_class(engine).parse_options(engine_options)     # refused before any download
    cmdline = args.append
    kernel, initrd = args.kernel, args.initrd
    if args.image is not None and kernel is not None:
        raise ConfigError("--image and --kernel exclude each other (--image boots pyhv's "
                          "cached Debian kernel)")
    pyhv_linux = kernel is None
    if pyhv_linux:
        from pyhv import images
        root_words: tuple[str, ...] = ()
        if args.image == "debian":
            img, root_words, vda = _debian_root_disk(overlays, _snapshot_dir(args))
            disks.insert(0, parse_disk(vda))
        else:
            img = images.ensure_linux_image(quiet=False)
        kernel, initrd = img.kernel_path, (initrd or img.initrd_path)
        if cmdline is None:
            words = [img.cmdline_default] + [w for w, _ in linux_workarounds(engine)]
            if args.command is not None:
                words.append("loglevel=1")   # only emergencies (a panic) between outputs
            if wants_dhcp(net):
                words.append(DHCP_WORD)
            cmdline = " ".join(words)
        else:
            # --append replaces pyhv's command line but not the engine's workarounds: without
            # them Linux misjudges emu's clocks (a panic, "IO-APIC + timer doesn't work!",
            # when the host is loaded). A word whose key the user gave is left to the user.
            keys = {w.split("=", 1)[0] for w in cmdline.split()}
            cmdline = " ".join([cmdline, *(w for w, _ in linux_workarounds(engine)
                                           if w.split("=", 1)[0] not in keys)])
        cmdline = " ".join([cmdline, *(w for w in root_words if w not in cmdline.split())])
    # after the image: --image debian's root disk comes first (vda)
    # a migration's destination opens its disks when it takes the VM over
    pci_devices = [make_function(d, i, held=args.incoming is None)
                   for i, d in enumerate(disks)]
    throwaway = {os.path.abspath(o.path) for o in overlays}
    pci_info: list[dict[str, object]] = [
        {"kind": "disk", "path": os.path.abspath(d.path), "format": d.format,
         "read_only": d.read_only, "serial": d.serial,
         **({"throwaway": True} if os.path.abspath(d.path) in throwaway else {})}
        for d in disks]
    if args.rng:
        pci_devices.append(_rng_function)
        pci_info.append({"kind": "rng"})
    if args.balloon:
        pci_devices.append(_balloon_function)
        pci_info.append({"kind": "balloon"})
    if net.kind != "none":
        pci_devices.append(make_nic(net, mac))
        pci_info.append({"kind": "net", "net": args.net, "mac": mac.hex()})
    marker: ExitMarker | None = None
    if args.command is not None:
        from pyhv import images
        marker = ExitMarker.fresh()
        cmdline = f"{cmdline or ''} {images.command_param(args.command, marker)}".strip()
    config = MachineConfig(kernel=kernel, cmdline=cmdline or "", initrd=initrd,
                           format=args.format, load_addr=args.load_addr, mem_size=mem,
                           engine=engine, strict_io=args.strict_io,
                           engine_options=engine_options, n_cpus=args.cpus,
                           pci_devices=pci_devices)
    return _run(args, config, marker, stack, None, None, pci_info)


def _run(args: argparse.Namespace, config: MachineConfig, marker: ExitMarker | None,
         stack: contextlib.ExitStack, restore: Callable[[Machine], None] | None,
         snapshot: str | None, pci_info: list[dict[str, object]]) -> int:
    """Run the machine of `config` (put in a snapshot's state first by `restore`, if
    given) until the guest ends; a guest reset restarts it (a restored guest's reset
    ends the run: there is no kernel to boot again)."""
    pinner = _cpu_scheduling(args, stack)
    _memory_limit(args, config.mem_size, stack)
    control = _start_control(args, stack)
    if control is not None:
        control.machine_info = {**_machine_info(args, config), "pci": pci_info}
        control.current_snapshot = snapshot
    csock = None
    if args.console_sock is not None:
        from pyhv.consolesock import ConsoleSocket
        csock = ConsoleSocket(args.console_sock)
        stack.callback(csock.close)
    incoming = None
    if args.incoming is not None:
        from pyhv.migration import Incoming
        incoming = Incoming(args.incoming)
        stack.callback(incoming.close)
        _stderr(f"pyhv: waiting for a migration on {incoming.uri}")
    pump = _output_pump()
    try:
        console = Console(pump.write if csock is None else _tee(pump, csock),
                          exit_marker=marker)
        t_end = None if args.timeout is None else time.monotonic() + args.timeout
        quick_resets = 0
        while True:
            timeout = None if t_end is None else max(0.001, t_end - time.monotonic())
            t_run = time.monotonic()
            result, runner, machine = _run_once(config, console, pump, args, timeout,
                                                control, pinner, csock, incoming, restore)
            incoming = None
            if result.reason != "reset" or args.on_reboot != "restart" or console.panic \
                    or restore is not None:
                break
            quick = time.monotonic() - t_run < RESET_LOOP_WINDOW_S
            quick_resets = quick_resets + 1 if quick else 0
            if quick_resets >= RESET_LOOP_LIMIT:
                result = R.RunResult(
                    R.STATUS_CRASH, "reset-loop",
                    f"the guest reset {quick_resets} times in a row, each within "
                    f"{RESET_LOOP_WINDOW_S:g} s of starting: a reset loop; ending the run")
                break
            _stderr(f"pyhv: the guest reset: restarting it"
                    f"{f' ({quick_resets} in a row)' if quick_resets > 1 else ''}")
    finally:
        pump.close()
    return _report(result, runner, machine, console, pump, args)


def _machine_info(args: argparse.Namespace, config: MachineConfig) -> dict[str, object]:
    """What `pyhv run --restore` needs to build this VM's machine again (besides the
    snapshot's vCPUs and RAM size), for the snapshots' manifests."""
    return {"strict_io": config.strict_io, "engine_options": dict(config.engine_options)}


def _cpu_scheduling(args: argparse.Namespace, stack: contextlib.ExitStack
                    ) -> Pinner | None:
    """--cpu-shares/--cpu-reservation/--cpu-limit: admit the VM and move this process
    into its own cgroup (removed when the run ends); --pin: the vCPU threads' pinner."""
    from pyhv import sched
    from pyhv.sched.settings import parse_percent, parse_shares
    wants_cgroup = (args.cpu_shares, args.cpu_reservation, args.cpu_limit) != (None,) * 3
    if not wants_cgroup and not args.pin:
        return None
    settings = sched.CpuSettings(
        shares=parse_shares(args.cpu_shares or "normal", args.cpus),
        reservation=(0.0 if args.cpu_reservation is None else
                     parse_percent(args.cpu_reservation, "--cpu-reservation")),
        limit=None if args.cpu_limit is None else parse_percent(args.cpu_limit, "--cpu-limit"),
        pin=sched.parse_pin(args.pin, args.cpus))
    vm = sched.VmCpu(args.name or f"run-{os.getpid()}", args.cpus, settings)
    host = sched.HostCpus.detect()
    pinned = settings.pinned_cpus()
    if pinned is not None and not pinned <= host.cpus:
        sched.admit([], vm, host)         # raises, naming the CPUs the host lacks
    if wants_cgroup:
        from pyhv.sched.placement import Placement
        try:
            placement = Placement.open(vm)
        except sched.CgroupUnavailable as e:
            raise ConfigError(f"--cpu-shares/--cpu-reservation/--cpu-limit: {e}") from e
        stack.callback(placement.close)
    if pinned is None:
        return None
    # the VM's other threads (console pump, control API, timers) run on its CPUs too, so a
    # VM pinned to CPU 1 neither runs on nor takes time from the other CPUs; each vCPU
    # thread then pins itself to its own set (Pinner, from the runner's hook)
    for tid in os.listdir("/proc/self/task"):
        sched.pin_thread(int(tid), pinned)
    return sched.Pinner(settings)


def _memory_limit(args: argparse.Namespace, mem: int, stack: contextlib.ExitStack) -> None:
    """--mem-limit: this process in its own memory cgroup for the run (removed after)."""
    if args.mem_limit is None:
        return
    from pyhv.sched import CgroupUnavailable
    from pyhv.sched.memcg import MemCgroup, check_limit, detect_memory
    from pyhv.sched.placement import default_parent
    limit = parse_size(args.mem_limit, default_unit="M")
    check_limit(limit)
    try:
        fs = detect_memory()
    except CgroupUnavailable as e:
        raise ConfigError(f"--mem-limit: {e}") from e
    group = MemCgroup(fs, args.name or f"run-{os.getpid()}", default_parent())
    group.create()
    stack.callback(group.remove)
    group.set_limit(limit)
    group.add(os.getpid())
    if limit < mem:
        _stderr(f"pyhv: --mem-limit {limit >> 20} MiB is below the guest's RAM "
                f"({mem >> 20} MiB): if the guest touches more, the kernel reclaims and "
                "may end this VM")


def _tee(pump: OutputPump, csock: ConsoleSocket) -> Callable[[bytes], None]:
    """The console's output to stdout and to the console socket's clients."""
    def sink(data: bytes) -> None:
        pump.write(data)
        csock.write(data)
    return sink


def _debian_root_disk(overlays: list[Overlay], directory: Path | None = None
                      ) -> tuple[images.LinuxImage, tuple[str, ...], str]:
    """--image debian: the cached Debian disk (built on first use) behind a throwaway
    overlay, to be the first virtio-blk disk (/dev/vda). Returns the kernel image that
    boots it, the command-line words it needs and the overlay's --disk option. A VM
    with a control API gets the overlay in its snapshot directory (`directory`), where
    a snapshot can keep it (pyhv.overlay)."""
    from pyhv import debian
    disk = debian.ensure_debian_disk(quiet=False)
    overlay = Overlay(disk.disk_path, directory)
    overlays.append(overlay)
    return disk.linux, disk.cmdline_words, disk_option(overlay.path)


def _rng_function(memory: GuestMemory, deferred: DeferredCalls) -> PciFunction:
    from pyhv.devices.virtio.rng import VirtioRng
    from pyhv.devices.virtio.transport import VirtioPciFunction
    return VirtioPciFunction(VirtioRng(), memory, deferred)


def _balloon_function(memory: GuestMemory, deferred: DeferredCalls) -> PciFunction:
    from pyhv.devices.virtio.balloon import VirtioBalloon
    from pyhv.devices.virtio.transport import VirtioPciFunction
    return VirtioPciFunction(VirtioBalloon(post=deferred.post), memory, deferred)


def _engine_options(pairs: list[str]) -> dict[str, str]:
    """`--engine-opt NAME=VALUE` words -> {NAME: VALUE}; the engine checks them."""
    out: dict[str, str] = {}
    for pair in pairs:
        name, eq, value = pair.partition("=")
        if not eq or not name:
            raise ConfigError(f"--engine-opt {pair!r}: expected NAME=VALUE (e.g. umip=on)")
        out[name] = value
    return out


def _run_once(config: MachineConfig, console: Console, pump: OutputPump,
              args: argparse.Namespace, timeout: float | None, control: VmControl | None,
              pinner: Pinner | None = None,
              csock: ConsoleSocket | None = None,
              incoming: Incoming | None = None,
              restore: Callable[[Machine], None] | None = None
              ) -> tuple[R.RunResult, R.Runner, Machine]:
    machine = Machine(config, console.write)
    terminal: Terminal | None = None
    gate: InputGate | None = None
    try:
        if restore is not None:
            restore(machine)
        if args.ksm and machine.memory is not None:
            from pyhv.sched.ksm import mark_mergeable
            mark_mergeable(machine.memory.regions)
        runner = R.Runner(machine, timeout=timeout)
        if pinner is not None:
            runner.on_vcpu_thread = pinner.on_thread
        if control is not None:
            control.attach(runner, machine)
        console.on_panic = lambda line: runner.stop(StopRequest("panic", R.STATUS_CRASH, line))
        _stop_on_signals(runner)

        def output_closed() -> None:
            runner.stop(StopRequest("output-closed", STATUS_OUTPUT_CLOSED))
        pump.on_closed = output_closed
        if pump.closed_by_reader:
            output_closed()
        if args.command is None:
            serial = machine.devices.serial
            # Linux drops bytes that arrive before /dev/console is open: hold piped input
            # until the guest enables the UART's receive interrupt.
            gate = InputGate(serial.feed, is_open=sys.stdin.isatty()
                             or machine.guest.format != "linux")
            the_gate = gate

            def turn() -> None:
                if not the_gate.is_open and serial.ier & IER_RDA:
                    the_gate.open()
                the_gate.pump()
            runner.on_turn = turn
            if csock is not None:
                def from_socket(data: bytes) -> None:
                    the_gate.feed(data)
                    runner.kick()
                csock.on_input = from_socket
            terminal = Terminal(gate.feed,
                                lambda: runner.stop(StopRequest(
                                    "escape", 0, f"console closed ({ESCAPE_NAME})")),
                                runner.kick)
            if terminal.is_tty:
                _stderr(f"pyhv: {machine.guest.description} on {machine.engine_name}; "
                        f"{ESCAPE_NAME} leaves")
            terminal.open()
        if incoming is not None:        # the guest's RAM and state come from the source
            session = incoming.receive(machine, timeout)
            session.announce(runner)
            _stderr(f"pyhv: migration received ({session.rounds} rounds, {session.pages} "
                    f"pages, {session.channel.received} bytes); the VM runs here now")
        result = runner.run()
    finally:
        if csock is not None:
            csock.on_input = None
        if control is not None:
            control.detach()
        if terminal is not None:
            terminal.close()
        if gate is not None:
            gate.close()
        console.finish()
        if args.ksm:        # before the RAM is unmapped: its merged pages count
            from pyhv.sched.ksm import report
            _stderr(f"pyhv: {report()}")
        machine.close()
    return result, runner, machine


def _stop_on_signals(runner: R.Runner) -> None:
    """SIGTERM / SIGHUP end the run cleanly (terminal restored, machine closed), with the
    shell's 128 + signal number as the status."""
    import signal
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in (signal.SIGTERM, signal.SIGHUP):
        def handler(num: int, _frame: object, name: str = sig.name) -> None:
            runner.stop(StopRequest("signal", 128 + num, f"stopped by {name}"))
        signal.signal(sig, handler)


def _report(result: R.RunResult, runner: R.Runner, machine: Machine, console: Console,
            pump: OutputPump, args: argparse.Namespace) -> int:
    status = result.status
    if result.reason == "internal":
        _internal_error(result, args)
    elif console.panic is not None:
        _stderr(f"pyhv: {console.panic}")
        status = R.STATUS_CRASH
    elif result.reason == "crash":
        where = f" at rip={result.rip:#x}" if result.rip is not None else ""
        insn = f" (instruction bytes: {result.insn.hex(' ')})" if result.insn else ""
        _stderr(f"pyhv: the guest crashed: {result.detail}{where}{insn}")
        _tail(console)
    elif result.reason == "timeout":
        lines = console.tail(10)
        _stderr(f"pyhv: {result.detail}" + ("; the last console lines:" if lines else
                                            " (the guest printed nothing)"))
        _tail(console)
    elif result.reason == "reset":
        _stderr(f"pyhv: the guest reset ({result.detail or 'reset'}); --on-reboot exit "
                "ends the run")
    elif result.reason == "reset-loop":
        _stderr(f"pyhv: {result.detail}")
        _tail(console)
    elif result.reason in ("destroy", "migrated"):
        _stderr(f"pyhv: {result.detail}")
    elif result.reason in ("interrupted", "signal"):
        _stderr(f"pyhv: {result.detail or 'interrupted'}")
    if pump.dropped and not pump.closed_by_reader:
        _stderr(f"pyhv: {pump.dropped} bytes of the guest's console output were dropped "
                "(stdout did not read them)")
    if args.command is not None and status == R.STATUS_OK and result.reason != "migrated":
        if console.exit_status is None:
            _stderr("pyhv: the guest stopped without reporting the command's exit status")
            status = R.STATUS_CRASH
        else:
            status = console.exit_status
    if args.stats:
        _print_stats(runner, machine, result)
    return status


def _internal_error(result: R.RunResult, args: argparse.Namespace) -> None:
    """One line; the traceback on stderr with --debug, else in a log file it names."""
    where = ""
    if args.debug:
        sys.stderr.write(result.traceback)
    else:
        try:
            with tempfile.NamedTemporaryFile("w", prefix="pyhv-internal-", suffix=".log",
                                             delete=False) as f:
                f.write(result.traceback)
            where = f"; the traceback is in {f.name} (or run with --debug)"
        except OSError:
            where = "; run with --debug for the traceback"
    _stderr(f"pyhv: internal error, a bug in pyhv (not the guest's doing): "
            f"{result.detail}{where}")


def _tail(console: Console) -> None:
    for line in console.tail(10):
        _stderr(f"  | {line}")


def _print_stats(runner: R.Runner, machine: Machine, result: R.RunResult) -> None:
    from rich.console import Console as RichConsole
    from rich.table import Table

    st = runner.stats
    out = RichConsole(file=sys.stderr, highlight=False)
    t = Table(title=f"pyhv run statistics (engine {machine.engine_name})", show_header=False)
    t.add_column(style="bold")
    t.add_column(justify="right")
    pyhv_time = max(0.0, st.t_total - st.t_guest - st.t_idle)
    t.add_row("wall time", f"{st.t_total:.3f} s")
    t.add_row("in the guest (vcpu.run)", f"{st.t_guest:.3f} s")
    t.add_row("in pyhv (exits, devices)", f"{pyhv_time:.3f} s")
    t.add_row("idle (guest halted)", f"{st.t_idle:.3f} s")
    for kind, n in st.exits.most_common():
        t.add_row(f"exits: {kind}", str(n))
    names = {base: name for base, _, name in machine.pio.devices()}
    for port, n in st.io_ports.most_common(8):
        hit = machine.pio.find(port)
        label = hit[2] if hit else "no device"
        t.add_row(f"port {port:#06x} ({names.get(port, label)})", str(n))
    t.add_row("unhandled port reads/writes",
              f"{machine.pio.unhandled_reads}/{machine.pio.unhandled_writes}")
    t.add_row("timers fired", str(machine.timers.fired))
    if len(runner.vcpus) > 1:
        per = [runner.slices[i] for i in range(len(runner.vcpus))]
        t.add_row("vCPU slices", f"{min(per)}-{max(per)} on each of {len(per)}")
    boot_ns = machine.devices.boot_timer.boot_ns
    if boot_ns is not None:
        host = machine.boot_host_s
        t.add_row("guest /init started (boot timer)", f"{boot_ns / 1e9:.3f} s guest time" + (
            f", {host:.3f} s host time" if host is not None else ""))
    t.add_row("guest time at the end", f"{machine.clock.now_ns() / 1e9:.3f} s")
    for key, value in runner.engine_stats.items():
        t.add_row(f"{machine.engine_name}: {key}",
                  f"{value:.3f}" if isinstance(value, float) else str(value))
    out.print(t)
    # what ended the run, outside the table (a long detail would make rich wrap its rows)
    _stderr(f"pyhv: the run ended by {result.reason}"
            + (f": {result.detail}" if result.detail else ""))
