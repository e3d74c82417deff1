"""Networking: back ends that carry a virtual NIC's Ethernet frames (docs/net.md).

pyhv.net.backend is the interface every back end implements; framing and framequeue
are the pieces they share; passt, tap, stream and dgram are the back ends; spec parses
`--net`/`--mac`.
"""
