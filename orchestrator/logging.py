"""Logging configuration: structlog JSON in production (not a terminal), console output in a terminal.

The only module-level state the project allows: logging is process-wide by nature.
"""

from __future__ import annotations

import logging
import sys

import structlog


def configure_logging(*, level: str = "info", json_output: bool | None = None) -> None:
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        raise ValueError(f"log level: {level!r} is not one of debug, info, warning, error")
    as_json = (not sys.stderr.isatty()) if json_output is None else json_output
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer() if as_json else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
    logging.basicConfig(level=max(numeric, logging.WARNING), stream=sys.stderr)
