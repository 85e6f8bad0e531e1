"""structlog setup: one JSON object per line, context variables merged first.

Records from the standard library's `logging` (aiohttp, asyncio) are rendered the same way into
the same stream, so one file or journal holds everything and nothing strays onto a terminal.
"""

from __future__ import annotations

import json
import logging
from typing import Any, TextIO

import structlog

from cloudtaskd import redact
from cloudtaskd.config import Config, Secret
from cloudtaskd.errors import is_no_space

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


_MAY_HOLD_SECRETS = (Secret, dict, list, tuple)  # a tuple: isinstance() is faster with it than with a union


def _hide(value: Any) -> Any:
    if isinstance(value, Secret):
        return redact.REDACTED
    if isinstance(value, dict):
        return {k: _hide(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_hide(v) for v in value]
    return value


def hide_secrets(_logger: Any, _method: str, event_dict: Any) -> Any:
    """Secret values become <SECRET>, also inside lists and dicts: JSON would write a Secret (a str)
    as its plain text. Any Secret, registered or not, of any length."""
    for key, value in event_dict.items():
        if isinstance(value, _MAY_HOLD_SECRETS):
            event_dict[key] = _hide(value)
    return event_dict


class RedactingRenderer:
    """JSON, then every registered secret value removed from the line: what reached the line as plain
    text (an f-string, an exception's message, a library's log record) is caught here. One substring
    search per registered value, none when nothing is registered."""

    def __init__(self) -> None:
        self._json = structlog.processors.JSONRenderer()

    def __call__(self, logger: Any, method: str, event_dict: Any) -> str:
        line = self._json(logger, method, event_dict)
        return redact.redact(line if isinstance(line, str) else line.decode())


def log_config_warnings(config: Config) -> None:
    """What load_config found probably wrong, once logging is set up (never a secret's value)."""
    log = structlog.get_logger("cloudtaskd.config")
    for w in config.warnings:
        log.warning(w.event, file=config.source, keys=list(w.keys), message=w.message, **dict(w.extra))

class NoSpaceTolerant:
    """A log stream that outlives a full disk. A line that cannot be written for lack of space is
    dropped, and counted, instead of raising into whoever logged: a log file on the state disk (the
    daemon `cloudtaskctl run` embeds writes there) must not kill the dispatcher or the reconciler
    while that disk is full. The count is written as a line of its own once writing works again."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.dropped = 0

    def write(self, text: str) -> int:
        try:
            if self.dropped:
                self.stream.write(json.dumps({"event": "log_lines_dropped", "level": "warning", "failed_writes":
                                              self.dropped, "reason": "no space left for the log"}) + "\n")
                self.dropped = 0
            return self.stream.write(text)
        except OSError as exc:
            if not is_no_space(exc):
                raise
            self.dropped += 1
            return 0

    def flush(self) -> None:
        try:
            self.stream.flush()
        except OSError as exc:
            if not is_no_space(exc):
                raise


# The handler configure() put on the root logger; replaced, never stacked, when called again.
_stdlib_handler: logging.Handler | None = None


def configure(level: str, stream: TextIO) -> None:
    global _stdlib_handler
    numeric = LEVELS.get(level, logging.INFO)
    out = NoSpaceTolerant(stream)
    timestamper = structlog.processors.TimeStamper(fmt="iso", utc=True)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            timestamper,
            structlog.processors.format_exc_info,
            hide_secrets,
            RedactingRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(out),  # type: ignore[arg-type]  # a file-like stream
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(out)
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
            hide_secrets,
            RedactingRenderer(),
        ],
    ))
    root = logging.getLogger()
    if _stdlib_handler is not None:
        root.removeHandler(_stdlib_handler)
    # Other handlers (pytest's capture, an embedding program's) are left alone, and so is the root
    # level: only what already passes it is rendered here.
    root.addHandler(handler)
    _stdlib_handler = handler
