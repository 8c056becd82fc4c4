"""``python -m server.compute.server``: serve the local processors over HTTP until SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import sys

import uvicorn

from server.compute.diffusion.models import ModelRegistryError
from server.compute.server.app import create_app
from server.compute.server.settings import ComputeServerSettings
from server.logs import configure

log = logging.getLogger(__name__)


async def serve(settings: ComputeServerSettings) -> None:
    """Run uvicorn on the settings' address; write the bound port when asked."""
    config = uvicorn.Config(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=False,
        lifespan="on",
    )
    server = uvicorn.Server(config)

    async def report_port() -> None:
        while not server.started:
            if server.should_exit:
                return
            await asyncio.sleep(0.02)
        port = server.servers[0].sockets[0].getsockname()[1]
        log.info("compute server on %s:%d", settings.host, port)
        if settings.port_file is not None:
            partial = settings.port_file.with_suffix(".partial")
            partial.write_text(f"{port}\n")
            partial.replace(settings.port_file)

    async with asyncio.TaskGroup() as group:
        group.create_task(report_port())
        group.create_task(server.serve())


def main() -> None:
    """Parse the settings once and serve."""
    settings = ComputeServerSettings()
    configure(settings.log_level)
    try:
        asyncio.run(serve(settings))
    except KeyboardInterrupt:
        sys.exit(0)
    except ModelRegistryError as exc:  # the models named, before anything serves
        sys.exit(f"sartiq-compute-server: cannot start: {exc}")


if __name__ == "__main__":
    main()
