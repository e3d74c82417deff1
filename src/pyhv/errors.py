"""The errors pyhv reports to its users.

Design: every failure a user can cause (a bad file, a bad size, a missing /dev/kvm) or a
guest can cause (a bad descriptor, an address outside RAM) is a subclass of `PyhvError`
whose message is one readable line. The CLI prints `pyhv: <message>` and exits with the
error's `exit_status`; a Python traceback reaching the user is a bug in pyhv.
"""

from __future__ import annotations


class PyhvError(Exception):
    """A failure explained in one line; the CLI prints it without a traceback."""

    exit_status = 2


class ConfigError(PyhvError):
    """Bad command-line input or configuration (sizes, paths, options)."""


class ImageError(PyhvError):
    """A kernel or disk image that is missing, truncated, malformed or unsupported."""


class HostError(PyhvError):
    """The host cannot do what was asked (no /dev/kvm, missing package, ioctl failure)."""


class GuestMemoryError(PyhvError):
    """A guest-physical access outside the guest's RAM (never turned into a host access)."""

    def __init__(self, gpa: int, size: int, why: str = "outside guest RAM") -> None:
        super().__init__(f"guest access at {gpa:#x} (+{size}) {why}")
        self.gpa = gpa
        self.size = size


class StateError(PyhvError):
    """A saved VM state (a device record, a vCPU record, a snapshot) that cannot be
    applied: malformed, from a newer pyhv, or for a different machine."""
