"""PCI: configuration space (config.py), functions and their BARs (function.py), and the
host bridge with configuration mechanism #1 and pyhv's firmware setup (host.py)."""
