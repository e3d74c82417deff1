"""Live migration (pre-copy) between two pyhv processes, over TCP.

    source (pyhv run ... --name VM)            destination (pyhv run ... --incoming URI)
    OutgoingMigration (source.py)  --HELLO-->  Incoming.receive (incoming.py)
                                   <--REPLY--  header.check: refuse or go on
    round 1: all RAM, guest running --PAGES-->  written into RAM
                                   --ROUND-->
                                   <--REPLY--  the round is in RAM
    round n: pages dirtied since   --PAGES--> ...
    pause; last pages; capture     --STATE-->  vmstate.apply; run
    stop the source run            <--REPLY--  "running", t_first

Files: stream.py (records: framing, CRC-32, MigrationError), header.py (the HELLO
header and the compatibility check), pages.py (PAGES records, zero-page markers),
bandwidth.py (measured rate, --bandwidth limit), throttle.py (auto-converge), uri.py
(tcp:HOST:PORT), source.py and incoming.py (the two ends), report.py (the CLI's
progress and final report). docs/migration.md is the prose.
"""

from pyhv.migration.incoming import Incoming, Session
from pyhv.migration.source import Options, OutgoingMigration
from pyhv.migration.stream import MigrationError

__all__ = ["Incoming", "MigrationError", "Options", "OutgoingMigration", "Session"]
