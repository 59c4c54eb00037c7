#!/usr/bin/env python3
"""A minimal SMTP server that plays the university's smarthost in tests: it accepts every message and
writes each one as JSON (sender, recipients, data) into a directory. Standard library only.

    smtp_sink.py --listen 127.0.0.1 --port 2525 --spool /tmp/sink --lifetime 600

It stops by itself after --lifetime seconds. The lab test imports `serve` and runs it in a thread.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import time
from pathlib import Path


async def _session(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, spool: Path) -> None:
    async def reply(line: str) -> None:
        writer.write((line + "\r\n").encode())
        await writer.drain()

    sender, recipients = "", []
    await reply("220 sink.test ESMTP test sink")
    while True:
        raw = await reader.readline()
        if not raw:
            break
        line = raw.decode(errors="replace").rstrip("\r\n")
        verb = line.split(" ", 1)[0].upper()
        if verb in ("EHLO", "HELO"):
            await reply("250-sink.test" if verb == "EHLO" else "250 sink.test")
            if verb == "EHLO":
                await reply("250 8BITMIME")
        elif verb == "MAIL":
            sender, recipients = line.split(":", 1)[1].strip().split(" ")[0].strip("<>"), []
            await reply("250 2.1.0 Ok")
        elif verb == "RCPT":
            recipients.append(line.split(":", 1)[1].strip().split(" ")[0].strip("<>"))
            await reply("250 2.1.5 Ok")
        elif verb == "DATA":
            await reply("354 End data with <CR><LF>.<CR><LF>")
            lines = []
            while True:
                data_line = (await reader.readline()).decode(errors="replace")
                if data_line.rstrip("\r\n") == "." or not data_line:
                    break
                lines.append(data_line[1:] if data_line.startswith("..") else data_line)
            message = {"from": sender, "to": recipients, "data": "".join(lines)}
            name = spool / f"{time.time_ns()}.json"
            name.with_suffix(".tmp").write_text(json.dumps(message))
            name.with_suffix(".tmp").rename(name)
            await reply("250 2.0.0 Ok: queued")
        elif verb == "QUIT":
            await reply("221 2.0.0 Bye")
            break
        elif verb in ("RSET", "NOOP"):
            await reply("250 2.0.0 Ok")
        else:
            await reply("502 5.5.2 Command not implemented")
    writer.close()


async def serve(
    listen: str, port: int, spool: Path, lifetime: float, started: asyncio.Event | None = None
) -> None:
    """Accept mail on listen:port into spool for at most lifetime seconds."""
    spool.mkdir(parents=True, exist_ok=True)
    server = await asyncio.start_server(lambda r, w: _session(r, w, spool), listen, port)
    if started is not None:
        started.set()
    async with server:
        with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
            await asyncio.wait_for(server.serve_forever(), timeout=lifetime)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=2525)
    parser.add_argument("--spool", type=Path, default=Path("/tmp/sink"))
    parser.add_argument("--lifetime", type=float, default=600)
    args = parser.parse_args()
    asyncio.run(serve(args.listen, args.port, args.spool, args.lifetime))


if __name__ == "__main__":
    main()
