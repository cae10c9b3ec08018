"""The ceiling: an ASGI app that reads the request body and answers a constant JSON document.

Served by uvicorn with the same worker count as the other servers, it shows the most requests
per second any HTTP service in Python can answer on this machine with this load.
"""

from __future__ import annotations

_BODY = b'{"model_name":"constant","model_version":"0","predictions":[]}'
_HEADERS = [(b"content-type", b"application/json"), (b"content-length", str(len(_BODY)).encode())]


async def app(scope, receive, send) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    more = True
    while more:  # drain the body, as a real service must
        message = await receive()
        more = message.get("more_body", False)
    await send({"type": "http.response.start", "status": 200, "headers": _HEADERS})
    await send({"type": "http.response.body", "body": _BODY})
