"""Disk images: raw and qcow2, behind one block-device API. Stand-alone: imports no engine."""
