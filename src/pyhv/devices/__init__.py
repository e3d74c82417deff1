"""Device models. They know guest memory and `IrqLine`, never an engine or /dev/kvm."""
