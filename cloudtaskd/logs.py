"""structlog setup: one JSON object per line, context variables merged first.

Records from the standard library's `logging` (aiohttp, asyncio) are rendered the same way into
the same stream, so one file or journal holds everything and nothing strays onto a terminal.
"""

from __future__ import annotations

import logging
from typing import TextIO

import structlog

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}

# The handler configure() put on the root logger; replaced, never stacked, when called again.
_stdlib_handler: logging.Handler | None = None


def configure(level: str, stream: TextIO) -> None:
    global _stdlib_handler
    numeric = LEVELS.get(level, logging.INFO)
    timestamper = structlog.processors.TimeStamper(fmt="iso", utc=True)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            timestamper,
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(stream),
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(stream)
    handler.setLevel(numeric)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[
            structlog.contextvars.merge_contextvars,
            structlog.stdlib.add_logger_name,
            structlog.stdlib.add_log_level,
            timestamper,
        ],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(),
        ],
    ))
    root = logging.getLogger()
    if _stdlib_handler is not None:
        root.removeHandler(_stdlib_handler)
    # Other handlers (pytest's capture, an embedding program's) are left alone, and so is the root
    # level: only what already passes it is rendered here.
    root.addHandler(handler)
    _stdlib_handler = handler
