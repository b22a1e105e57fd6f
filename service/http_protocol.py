"""uvicorn's httptools HTTP protocol with the limits a server on a network needs.

uvicorn bounds neither how long a client may take to send a request's head (a half-sent header
holds a connection open for as long as the client likes) nor, with its httptools parser, the size
of the head (a 10 MB header, or 20,000 headers, were accepted). :class:`LimitedHttpToolsProtocol`
adds:

- a deadline for the request head (``DINO_HEADER_TIMEOUT``): from the connection's start, and from the
  end of each response on a kept-alive connection, the next request's head must be complete within
  it, or the connection is closed;
- a limit on the size of the request head (``DINO_MAX_HEADER_BYTES``): above it the request is
  refused with 400 before it is parsed further.

httptools comes with the serve extra (``uvicorn[standard]``). A stalled *body* is the application's
concern: :class:`service.uploads.BodySizeLimitMiddleware` answers 408 when no body data arrives
within ``DINO_BODY_TIMEOUT``. The idle time between requests is uvicorn's ``timeout_keep_alive``
(``DINO_KEEP_ALIVE_TIMEOUT``).
"""

from __future__ import annotations

import asyncio
import functools
import logging
from typing import Any

from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

from service.settings import ServiceSettings

log = logging.getLogger(__name__)
#: bytes a header line adds besides its name and value (": " and CRLF)
HEADER_LINE_OVERHEAD = 4


@functools.cache
def _limits() -> tuple[float, int]:
    # uvicorn builds the protocol itself, in every worker process: the settings are read there, once
    settings = ServiceSettings()
    return settings.header_timeout, settings.max_header_bytes


class LimitedHttpToolsProtocol(HttpToolsProtocol):
    """:class:`HttpToolsProtocol` with a deadline and a size limit for the request head. Use it as
    ``uvicorn.run(..., http=LimitedHttpToolsProtocol)``.

    The parser holds a header until it is complete, so the bytes received while a head is under way
    are counted too: a single 10 MB header is refused as it streams in, not once parsed.
    """

    def __init__(self, config: Config, server_state: ServerState, app_state: dict[str, Any], *args: Any, **kwargs: Any):
        super().__init__(config, server_state, app_state, *args, **kwargs)
        self.header_timeout, self.max_header_bytes = _limits()
        self._head_deadline: asyncio.TimerHandle | None = None
        self._in_head = False  # a request has begun and its head is not complete yet
        self._head_bytes = 0  # exact size of the head's url and headers so far
        self._raw_head_bytes = 0  # bytes received while a head was awaited or under way

    # ------------------------------------------------------------------ uvicorn's hooks

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        self._arm_head_deadline()

    def data_received(self, data: bytes) -> None:
        if self._in_head or self._head_deadline is not None:
            self._raw_head_bytes += len(data)
        super().data_received(data)
        if self._in_head and self._raw_head_bytes > self.max_header_bytes and not self.transport.is_closing():
            self._in_head = False
            self._disarm_head_deadline()
            self.send_400_response(f"Request head larger than {self.max_header_bytes} bytes.")

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm_head_deadline()  # the next request on this kept-alive connection

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_head_deadline()
        super().connection_lost(exc)

    # ------------------------------------------------------------------ parser callbacks

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head, self._head_bytes = True, 0

    def on_url(self, url: bytes) -> None:
        super().on_url(url)
        self._count_head(len(url))

    def on_header(self, name: bytes, value: bytes) -> None:
        super().on_header(name, value)
        self._count_head(len(name) + len(value) + HEADER_LINE_OVERHEAD)

    def on_headers_complete(self) -> None:
        self._in_head, self._raw_head_bytes = False, 0
        self._disarm_head_deadline()
        super().on_headers_complete()

    # ------------------------------------------------------------------ the limits

    def _count_head(self, size: int) -> None:
        self._head_bytes += size
        if self._head_bytes > self.max_header_bytes:
            # raised inside a parser callback: httptools reports it as a parser error, and
            # data_received answers 400 and closes the connection
            raise ValueError(f"request head larger than {self.max_header_bytes} bytes")

    def _arm_head_deadline(self) -> None:
        self._disarm_head_deadline()
        self._head_deadline = self.loop.call_later(self.header_timeout, self._head_timed_out)

    def _disarm_head_deadline(self) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
            self._head_deadline = None

    def _head_timed_out(self) -> None:
        self._head_deadline = None
        if not self.transport.is_closing():
            log.info("closing a connection whose request head took over %.0f s", self.header_timeout)
            self.transport.close()
