"""A snapshot directory's manifest: what the snapshot is and how to check its files.

    <dir>/manifest.json   this record
    <dir>/vmstate.json    the machine's state (pyhv.vmstate), RAM aside
    <dir>/ram.img         guest RAM, sparse (pyhv.snapshot.ramfile)

Fields: `format` (FORMAT_VERSION: a newer one is refused), `pyhv_version` (the writer's,
informative), `name`, `vm` (the VM's name), `parent` (the snapshot this one was taken
after: the tree), `created` (UTC, ISO 8601), `engine`, `cpus`, `mem_size`, `devices`
(the device record names: the device set), `machine` (what `pyhv run --restore` needs
to rebuild the machine: strict_io, engine options, the virtio devices), `disks` (each
disk's image, format and the internal snapshot of the same name), and `files`: for each
file its size and SHA-256 (ram.img: the content checksum of ramfile.py, and
`sha256_extents`, the quick check's digest of its size and data extents; a manifest
without it, from an older pyhv, gets the full check).

Checks (`Manifest.from_json`, `check_files`): every field's type and range, a known
format, file names limited to the three above, sizes and checksums matching: a damaged
or foreign snapshot is a StateError naming what differs, found before anything runs.

Invariants: a manifest is written last (after the files it checks), into a directory
that is renamed into place only when complete, so a snapshot that exists is whole.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pyhv.devices.state import MAX_NS, Reader, check_version
from pyhv.errors import StateError
from pyhv.snapshot.ramfile import extent_digest, ram_checksum

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
VMSTATE = "vmstate.json"
RAM = "ram.img"
FILES = (VMSTATE, RAM)
MAX_JSON = 64 << 20            # the largest manifest or vmstate file read
NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,63}")


def check_name(name: str) -> str:
    """A snapshot's name: 1-64 of A-Za-z0-9._- (not starting with '.' or '-')."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise StateError(f"bad snapshot name {name!r}: 1-64 of A-Za-z0-9._- , not "
                         "starting with '.' or '-'")
    return name


@dataclass
class Manifest:
    name: str
    vm: str
    engine: str
    cpus: int
    mem_size: int
    devices: list[str]
    files: dict[str, dict[str, Any]]
    created: str
    parent: str | None = None
    machine: dict[str, Any] = field(default_factory=dict)
    disks: list[dict[str, Any]] = field(default_factory=list)
    pyhv_version: str = ""
    format: int = FORMAT_VERSION

    def to_json(self) -> dict[str, Any]:
        return {"format": self.format, "pyhv_version": self.pyhv_version,
                "name": self.name, "vm": self.vm, "parent": self.parent,
                "created": self.created, "engine": self.engine, "cpus": self.cpus,
                "mem_size": self.mem_size, "devices": self.devices,
                "machine": self.machine, "disks": self.disks, "files": self.files}

    @classmethod
    def from_json(cls, data: object) -> Manifest:
        r = Reader("manifest", data)
        fmt = check_version("snapshot format", r.int("format", 0, 1 << 31), FORMAT_VERSION)
        m = cls(pyhv_version=r.str("pyhv_version", 64), name=check_name(r.str("name", 64)),
                vm=r.str("vm", 256), parent=None, created=r.str("created", 64),
                engine=r.str("engine", 32), cpus=r.int("cpus", 1, 256),
                mem_size=r.int("mem_size", 4096, 1 << 48), devices=[], files={},
                format=fmt)
        parent = r.raw("parent")
        m.parent = None if parent is None else check_name(parent)
        devices = r.raw("devices")
        if not isinstance(devices, list) or not all(isinstance(d, str) for d in devices):
            raise StateError("manifest: field 'devices' is not a list of names")
        m.devices = list(devices)
        machine = r.raw("machine")
        disks = r.raw("disks")
        if not isinstance(machine, dict):
            raise StateError("manifest: field 'machine' is not an object")
        if not isinstance(disks, list) or not all(isinstance(d, dict) for d in disks):
            raise StateError("manifest: field 'disks' is not a list of objects")
        m.machine, m.disks = machine, disks
        files = r.sub("files")
        if sorted(files.keys()) != sorted(FILES):
            raise StateError(f"manifest: the files are {', '.join(files.keys())}, not "
                             f"{', '.join(FILES)}")
        for name in FILES:
            f = files.sub(name)
            entry: dict[str, Any] = {"size": f.int("size", 0, MAX_NS)}
            key = "sha256_pages" if name == RAM else "sha256"
            digest = f.str(key, 64)
            if not re.fullmatch(r"[0-9a-f]{64}", digest):
                raise StateError(f"manifest: files.{name}.{key} is not a SHA-256")
            entry[key] = digest
            if name == RAM and f.has("sha256_extents"):
                quick = f.str("sha256_extents", 64)
                if not re.fullmatch(r"[0-9a-f]{64}", quick):
                    raise StateError(f"manifest: files.{name}.sha256_extents is not a "
                                     "SHA-256")
                entry["sha256_extents"] = quick
            f.done()
            m.files[name] = entry
        files.done()
        r.done()
        return m


def file_entry(path: Path, ram_digest: str | None = None) -> dict[str, Any]:
    size = path.stat().st_size
    if ram_digest is not None:
        return {"size": size, "sha256_pages": ram_digest,
                "sha256_extents": extent_digest(path)}
    return {"size": size, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}


def read_json(path: Path, what: str) -> Any:
    try:
        size = path.stat().st_size
        if size > MAX_JSON:
            raise StateError(f"{what} {path} is {size} bytes: not a pyhv snapshot file")
        return json.loads(path.read_bytes())
    except FileNotFoundError:
        raise StateError(f"{path.parent} is not a pyhv snapshot: no {path.name}") from None
    except OSError as e:
        raise StateError(f"cannot read {path}: {e.strerror}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise StateError(f"{what} {path} is not valid JSON: {e}") from None


def load_manifest(snapdir: Path) -> Manifest:
    return Manifest.from_json(read_json(snapdir / MANIFEST, "the manifest"))


def check_files(snapdir: Path, m: Manifest, *, ram: str = "full") -> None:
    """StateError unless every file is there with the size and checksum the manifest
    gives. `ram`: "full" hashes the RAM file's content; "quick" compares the digest of
    its size and data extents, falling back to the full hash when they differ or the
    manifest has none (ramfile.py: what each catches); "size" checks its size only."""
    if ram not in ("full", "quick", "size"):
        raise ValueError(f"check_files: ram={ram!r}")
    for name in FILES:
        path = snapdir / name
        want = m.files[name]
        try:
            size = path.stat().st_size
        except OSError:
            raise StateError(f"snapshot {snapdir}: {name} is missing") from None
        if size != want["size"]:
            raise StateError(f"snapshot {snapdir}: {name} is {size} bytes, the manifest "
                             f"says {want['size']} (damaged)")
        if name == RAM:
            if ram == "size" or (ram == "quick" and "sha256_extents" in want
                                 and extent_digest(path) == want["sha256_extents"]):
                continue
            if ram_checksum(path) != want["sha256_pages"]:
                raise StateError(f"snapshot {snapdir}: {name} does not match its "
                                 "checksum (damaged)")
        elif hashlib.sha256(path.read_bytes()).hexdigest() != want["sha256"]:
            raise StateError(f"snapshot {snapdir}: {name} does not match its checksum "
                             "(damaged)")
