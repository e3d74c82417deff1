"""What the host daemon's API takes and answers: the VM definition and the VM record.

A `VmDefinition` is what `define` stores: the `pyhv run` options of a VM (kernel or
pyhv's cached image, initrd, kernel command line or `--command`, memory, vCPUs, engine,
disks, networks) plus its CPU settings (shares, reservation, limit, vCPU pinning), which
pyhv.hostd.cpu checks and applies through the scheduling module (pyhv.sched). Validation here is of
form (types, ranges, exclusive options, no unknown field); what depends on the host (a
kernel file that exists, memory that fits) is checked by the manager at define time.

Invariants: a definition converts to exactly one `pyhv run` argument list (`run_args`);
unknown fields are refused (a typo never silently drops a setting).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

NAME_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,63}$"
STATES = ("stopped", "starting", "running", "paused", "crashed")
State = Literal["stopped", "starting", "running", "paused", "crashed"]
ENGINE_NAMES = ("auto", "kvm", "emu", "trap", "bt", "pv")


class VmDefinition(BaseModel):
    """A VM as `define` takes it."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=NAME_PATTERN, description="1-64 letters, digits, '.', '_', "
                      "'-'; not starting with '.' or '-'")
    kernel: str | None = Field(None, description="absolute path of a kernel image (any "
                               "format `pyhv run --kernel` takes); without it, `image`")
    image: Literal["linux", "debian"] | None = Field(
        None, description="pyhv's cached guest (`pyhv run --image`); the default when "
        "no kernel is given is linux")
    initrd: str | None = Field(None, description="absolute path of an initial ramdisk")
    cmdline: str | None = Field(None, max_length=4096,
                                description="kernel command line (`--append`)")
    command: str | None = Field(None, max_length=4096, description="Linux: a command to "
                                "run instead of a shell (`--command`)")
    memory_mib: int = Field(128, ge=2, le=1 << 20, description="guest RAM in MiB")
    vcpus: int = Field(1, ge=1, le=16)
    engine: Literal["auto", "kvm", "emu", "trap", "bt", "pv"] = "auto"
    disks: list[str] = Field(default_factory=list, max_length=16, description="`--disk` "
                             "specifications: PATH[,format=raw|qcow2][,readonly=on]...")
    networks: list[str] = Field(default_factory=list, max_length=1, description="`--net` "
                                "back ends (user, tap=NAME, socket=...); one NIC today")
    cpu_shares: int | None = Field(None, ge=2, le=262144, description="relative CPU "
                                   "weight under contention (ESX's shares; default 1000 "
                                   "per vCPU)")
    cpu_reservation: float | None = Field(None, ge=0, description="CPU time guaranteed "
                                          "under contention, in percent of one host CPU")
    cpu_limit: float | None = Field(None, ge=1, description="the most CPU time it may use, "
                                    "in percent of one host CPU")
    pin: list[str] | None = Field(None, min_length=1, max_length=16, description="host "
                                  "CPU lists ('0', '0-1', '0,2'): one for every vCPU, or "
                                  "one per vCPU in order")
    on_reboot: Literal["restart", "exit"] = "restart"

    @model_validator(mode="after")
    def _consistent(self) -> VmDefinition:
        if self.kernel is not None and self.image is not None:
            raise ValueError("kernel and image exclude each other")
        for field in ("kernel", "initrd"):
            value = getattr(self, field)
            if value is not None and not value.startswith("/"):
                raise ValueError(f"{field} must be an absolute path (the daemon does not "
                                 "share the client's working directory)")
        return self

    def run_args(self) -> list[str]:
        """The `pyhv run` options of this definition (without --name and the sockets)."""
        args = ["--mem", f"{self.memory_mib}M", "--cpus", str(self.vcpus),
                "--engine", self.engine, "--on-reboot", self.on_reboot]
        if self.kernel is not None:
            args += ["--kernel", self.kernel]
        elif self.image is not None:
            args += ["--image", self.image]
        if self.initrd is not None:
            args += ["--initrd", self.initrd]
        if self.cmdline is not None:
            args += ["--append", self.cmdline]
        if self.command is not None:
            args += ["--command", self.command]
        for disk in self.disks:
            args += ["--disk", disk]
        for net in self.networks:
            args += ["--net", net]
        return args


class Vm(BaseModel):
    """A VM as the API answers it: its definition and where it stands."""

    name: str
    uuid: str
    state: State
    pid: int | None = Field(description="the VM process while it runs")
    started_at: float | None = Field(description="UNIX time of the last start")
    last_exit: str | None = Field(description="how the last run ended")
    definition: VmDefinition


class VmList(BaseModel):
    vms: list[Vm]


class Event(BaseModel):
    id: int
    time: float
    vm: str | None
    kind: str
    message: str


class EventList(BaseModel):
    events: list[Event]


class HostStats(BaseModel):
    hostname: str
    version: str
    daemon_pid: int
    daemon_uptime_s: float
    cpus: int
    loadavg: list[float]
    memory_total_mib: int
    memory_available_mib: int
    memory_capacity_mib: int = Field(description="what the daemon admits VMs against")
    memory_committed_mib: int = Field(description="memory of the VMs that run")
    vcpus_committed: int
    vms: dict[str, int] = Field(description="number of VMs in each state")
    cpu_controller: str = Field(description="the cgroup CPU controller the daemon uses, "
                                            "or why there is none")
    cpu_reserved_pct: float = Field(description="the running VMs' CPU reservations, in "
                                                "percent of one CPU")
    cpu_capacity_pct: float = Field(description="100 x the CPUs the daemon may use")


class Problem(BaseModel):
    detail: str


class SnapshotRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=NAME_PATTERN, description="the snapshot's name")


class MigrateRequest(BaseModel):
    """Move a running VM to another pyhv host daemon (its URL and token)."""

    model_config = ConfigDict(extra="forbid")
    to: str = Field(pattern=r"^http://[^/\s]+(:\d+)?/?$", description="the destination "
                    "daemon's TCP address, http://HOST:PORT (HOST is also where the "
                    "migration stream goes)")
    token: str = Field(min_length=1, max_length=512, description="the destination "
                       "daemon's API token")
    max_downtime_ms: float | None = Field(None, gt=0, le=3.6e6)
    bandwidth_mbps: float | None = Field(None, gt=0, le=1e6)
    max_rounds: int | None = Field(None, ge=1, le=10000)
    auto_converge: bool | None = None

    def options(self) -> dict[str, object]:
        """The VM control API's PUT /migrate fields (without uri) that were given."""
        return {k: v for k, v in self.model_dump().items()
                if k not in ("to", "token") and v is not None}


class IncomingRequest(BaseModel):
    """Destination side of a migration between daemons (sent by the source daemon)."""

    model_config = ConfigDict(extra="forbid")
    definition: VmDefinition
    listen_host: str = Field("127.0.0.1", pattern=r"^[A-Za-z0-9.:_-]{1,253}$",
                             description="the address to receive the migration on")
