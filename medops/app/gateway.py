"""A train worker's gateway: ``python -m medops.app.gateway ADDRESS PORT...`` listens on ADDRESS
(the host side of the worker's veth pair, never a wider address) on each PORT and forwards every
connection to 127.0.0.1 on the same port, where the platform's services listen."""

from __future__ import annotations

import asyncio
import contextlib
import sys
from functools import partial

TARGET = "127.0.0.1"


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        with contextlib.suppress(OSError):  # ConnectionError included
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
    finally:
        with contextlib.suppress(OSError):
            writer.close()


async def _forward(port: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        target_reader, target_writer = await asyncio.open_connection(TARGET, port)
    except OSError:
        writer.close()
        return
    await asyncio.gather(_pipe(reader, target_writer), _pipe(target_reader, writer))


async def serve(address: str, ports: list[int]) -> None:
    servers = [await asyncio.start_server(partial(_forward, port), address, port, reuse_address=True) for port in ports]
    print(f"gateway on {address}, ports {ports} -> {TARGET}", flush=True)
    await asyncio.gather(*(server.serve_forever() for server in servers))


def main(argv: list[str]) -> None:
    address, *ports = argv
    asyncio.run(serve(address, [int(port) for port in ports]))


if __name__ == "__main__":
    main(sys.argv[1:])
