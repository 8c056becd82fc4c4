"""An S3-compatible server (moto's, in server mode) in its own process, for the storage tests.

    python tests/s3_server.py PORT_FILE

Listens on 127.0.0.1, a free port, written to PORT_FILE once it serves; stops on SIGTERM.
Everything it stores is in its memory: each test uses a bucket of its own.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

from moto.server import ThreadedMotoServer


def main(port_file: Path) -> None:
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    _, port = server.get_host_and_port()
    tmp = port_file.with_name(f".{port_file.name}.tmp")
    tmp.write_text(f"{port}\n")
    os.replace(tmp, port_file)  # a reader sees no port or the whole of it
    signal.sigwait({signal.SIGTERM, signal.SIGINT})
    server.stop()


if __name__ == "__main__":
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    main(Path(sys.argv[1]))
