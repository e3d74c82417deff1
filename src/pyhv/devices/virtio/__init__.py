"""virtio over PCI: split virtqueues (queue.py), the modern PCI transport shared by every
device (transport.py), the device-side interface (device.py), and the devices."""
