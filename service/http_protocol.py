"""uvicorn's HTTP protocols with the limits a server on a network needs.

uvicorn bounds neither how long a client may take to send a request's head (a half-sent header
holds a connection open for as long as the client likes) nor, with its httptools parser, the size
of the head (a 10 MB header, or 20,000 headers, were accepted). The protocols here add:

- a deadline for the request head (``DINO_HEADER_TIMEOUT``): from the connection's start, and from the
  end of each response on a kept-alive connection, the next request's head must be complete within
  it, or the connection is closed;
- a limit on the size of the request head (``DINO_MAX_HEADER_BYTES``): above it the request is
  refused with 400 before it is parsed further.

:class:`LimitedHttpToolsProtocol` (uvicorn's fast httptools parser, counted by hand) is used when
httptools is installed (``uvicorn[standard]``), :class:`LimitedH11Protocol` (h11's own limit)
otherwise: :func:`limited_protocol` picks one.

A stalled *body* is the application's concern: :class:`service.uploads.BodySizeLimitMiddleware`
answers 408 when no body data arrives within ``DINO_BODY_TIMEOUT``. The idle time between requests
is uvicorn's ``timeout_keep_alive`` (``DINO_KEEP_ALIVE_TIMEOUT``).
"""

from __future__ import annotations

import asyncio
import functools
import logging
from typing import Any

import h11
from uvicorn.config import Config
from uvicorn.protocols.http.h11_impl import H11Protocol
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


class _HeadDeadline:
    """The request-head deadline, shared by both protocols: armed when a connection opens and after
    each response, disarmed once a request's head is complete, and closing the connection if it
    fires first."""

    loop: asyncio.AbstractEventLoop
    transport: asyncio.Transport
    header_timeout: float
    _head_deadline: asyncio.TimerHandle | None

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


class LimitedH11Protocol(_HeadDeadline, H11Protocol):
    """:class:`H11Protocol` with the head deadline; the head size is h11's
    ``max_incomplete_event_size`` (uvicorn's ``h11_max_incomplete_event_size``)."""

    def __init__(self, config: Config, server_state: ServerState, app_state: dict[str, Any], *args: Any, **kwargs: Any):
        super().__init__(config, server_state, app_state, *args, **kwargs)
        self.header_timeout, _ = _limits()
        self._head_deadline = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head_deadline()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:  # the head is complete: a request is under way
            self._disarm_head_deadline()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm_head_deadline()  # the next request on this kept-alive connection

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_head_deadline()
        super().connection_lost(exc)


try:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
except ImportError:  # httptools not installed: h11 only
    HttpToolsProtocol = None  # type: ignore[assignment,misc]


if HttpToolsProtocol is not None:

    class LimitedHttpToolsProtocol(_HeadDeadline, HttpToolsProtocol):
        """:class:`HttpToolsProtocol` with the head deadline and a head size limit.

        The parser holds a header until it is complete, so the bytes received while a head is under
        way are counted too: a single 10 MB header is refused as it streams in, not once parsed.
        """

        def __init__(
            self, config: Config, server_state: ServerState, app_state: dict[str, Any], *args: Any, **kwargs: Any
        ):
            super().__init__(config, server_state, app_state, *args, **kwargs)
            self.header_timeout, self.max_header_bytes = _limits()
            self._head_deadline = None
            self._in_head = False  # a request has begun and its head is not complete yet
            self._head_bytes = 0  # exact size of the head's url and headers so far
            self._raw_head_bytes = 0  # bytes received while a head was under way

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm_head_deadline()

        def data_received(self, data: bytes) -> None:
            if self._in_head or self._head_deadline is not None:
                self._raw_head_bytes += len(data)
            super().data_received(data)
            if self._in_head and self._raw_head_bytes > self.max_header_bytes and not self.transport.is_closing():
                self._refuse_head()

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

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm_head_deadline()  # the next request on this kept-alive connection

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm_head_deadline()
            super().connection_lost(exc)

        def _count_head(self, size: int) -> None:
            self._head_bytes += size
            if self._head_bytes > self.max_header_bytes:
                # raised inside a parser callback: httptools reports it as a parser error, and
                # data_received answers 400 and closes the connection
                raise ValueError(f"request head larger than {self.max_header_bytes} bytes")

        def _refuse_head(self) -> None:
            self._in_head = False
            self._disarm_head_deadline()
            self.send_400_response(f"Request head larger than {self.max_header_bytes} bytes.")


def limited_protocol() -> type[asyncio.Protocol]:
    """The HTTP protocol class for ``uvicorn.run(http=...)``: httptools when installed, else h11."""
    if HttpToolsProtocol is not None:
        return LimitedHttpToolsProtocol
    return LimitedH11Protocol
