"""Structured JSON logging (structlog) shared by the host and the enclave worker."""

from __future__ import annotations

import logging
import os
import sys

import structlog


def configure_logging(component: str, level: str | None = None) -> None:
    """JSON lines on stderr; every event carries the component name."""
    lvl = getattr(logging, (level or os.environ.get("SIGNER_LOG_LEVEL", "INFO")).upper(), logging.INFO)
    logging.basicConfig(stream=sys.stderr, level=max(lvl, logging.WARNING), format="%(message)s")
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(lvl),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )
    structlog.contextvars.bind_contextvars(component=component)
