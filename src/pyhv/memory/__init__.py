"""Guest memory: RAM regions and bounds-checked guest-physical access.

Imports nothing else from pyhv but `errors`.
"""

from pyhv.memory.guest import PAGE_SHIFT, PAGE_SIZE, GuestMemory
from pyhv.memory.region import MemoryRegion

__all__ = ["PAGE_SHIFT", "PAGE_SIZE", "GuestMemory", "MemoryRegion"]
