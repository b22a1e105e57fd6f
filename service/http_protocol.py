"""uvicorn's h11 HTTP protocol with the limits a server on a network needs.

uvicorn bounds neither how long a client may take to send a request's head (a half-sent header
holds a connection open for as long as the client likes) nor, with its httptools parser, the size
of the head (a 10 MB header, or 20,000 headers, were accepted). This protocol adds:

- a deadline for the request head (``DINO_HEADER_TIMEOUT``): from the connection's start, and from the
  end of each response on a kept-alive connection, the next request's head must be complete within
  it, or the connection is closed;
- h11's limit on the size of the request head (``DINO_MAX_HEADER_BYTES``, given to uvicorn as
  ``h11_max_incomplete_event_size``): above it the request is
  refused with 400 before it is parsed further.

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


@functools.cache
def _header_timeout() -> float:
    # uvicorn builds the protocol itself, in every worker process: the settings are read there, once
    return ServiceSettings().header_timeout


class LimitedH11Protocol(H11Protocol):
    """:class:`H11Protocol` that closes connections whose request head is not complete in time
    (``DINO_HEADER_TIMEOUT``). Use it as ``uvicorn.run(..., http=LimitedH11Protocol)``."""

    def __init__(self, config: Config, server_state: ServerState, app_state: dict[str, Any], *args: Any, **kwargs: Any):
        super().__init__(config, server_state, app_state, *args, **kwargs)
        self.header_timeout = _header_timeout()
        self._head_deadline: asyncio.TimerHandle | None = None

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

    def _arm_head_deadline(self) -> None:
        self._disarm_head_deadline()
        self._head_deadline = self.loop.call_later(self.header_timeout, self._head_timed_out)

    def _disarm_head_deadline(self) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
            self._head_deadline = None

    def _head_timed_out(self) -> None:
        self._head_deadline = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            log.info("closing a connection whose request head took over %.0f s", self.header_timeout)
            self.transport.close()
