"""qcow2 images (QEMU's docs/interop/qcow2.txt), versions 2 and 3.

Public surface: `Qcow2Image` (open, block-device API, snapshots), `create`, `check`.
"""

from pyhv.disk.qcow2.check import CheckResult, check
from pyhv.disk.qcow2.create import create
from pyhv.disk.qcow2.image import Qcow2Image

__all__ = ["CheckResult", "Qcow2Image", "check", "create"]
