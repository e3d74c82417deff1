"""pyhv's host daemon (`pyhv host serve`): one process that manages the VMs of a machine.

Modules, one concept each:
    statedir   the state directory's layout, its privacy checks, the token file, the lock
               that makes one daemon per state directory
    models     the VM definition (what `define` takes) and what the API answers, with
               their validation
    inventory  the SQLite inventory: definitions, states, events; survives restarts
    vmproc     a VM's process: started as `pyhv run --name ... --console-sock ...` in its
               own session, probed, stopped, killed
    manager    the daemon's logic: lifecycle operations, admission, the monitor that
               notices VMs ending, adoption of running VMs after a restart
    app        the REST API (FastAPI) with bearer-token authentication, and the console
               websocket
    server     binding the TCP and UNIX sockets and serving the app with uvicorn
    client     the HTTP client the `pyhv vm` commands use
    cmd_host   `pyhv host serve`;  cmd_vm: `pyhv vm define/start/...` (virsh's verbs)

docs/host-daemon.md describes the whole; docs/api/host.openapi.json is the API's contract.
"""
