"""Structured, quiet-by-default logging (logfmt lines on stderr)."""

from __future__ import annotations

import logging
import os
import sys
import time

_QUIET_LIBS = ("transformers", "accelerate", "numba", "grpc", "urllib3", "filelock", "huggingface_hub")


class LogfmtFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"
        parts = [f"ts={ts}", f"level={record.levelname.lower()}", f"logger={record.name}", f"msg={_quote(record.getMessage())}"]
        for key, value in getattr(record, "fields", {}).items():
            parts.append(f"{key}={_quote(str(value))}")
        if record.exc_info:
            parts.append(f"exc={_quote(self.formatException(record.exc_info))}")
        return " ".join(parts)


def _quote(s: str) -> str:
    if s and all(c.isalnum() or c in "-_./:@" for c in s):
        return s
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


class StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a record is emitted, not the stream of set-up time.

    A handler bound at set-up keeps a stream that may be closed later (a CLI entry point called in
    process, whose caller then swaps stderr back): every later record would print a logging error.
    """

    def __init__(self) -> None:
        logging.Handler.__init__(self)

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def setup_logging(verbose: int = 0, service: str | None = None) -> None:
    """WARNING by default; -v: INFO; -vv: DEBUG. Third-party libraries stay at WARNING or above.

    Idempotent: replaces the handler an earlier call installed (and a plain handler on stderr, such as
    ``logging.basicConfig``'s); other handlers (files, a test's capture) stay.
    """
    level = logging.WARNING if verbose <= 0 else logging.INFO if verbose == 1 else logging.DEBUG
    root = logging.getLogger()
    for h in list(root.handlers):
        if isinstance(h, StderrHandler) or (type(h) is logging.StreamHandler and h.stream in (sys.stderr, sys.__stderr__)):
            root.removeHandler(h)
    handler = StderrHandler()
    handler.setFormatter(LogfmtFormatter())
    root.addHandler(handler)
    root.setLevel(level)
    for lib in _QUIET_LIBS:
        logging.getLogger(lib).setLevel(max(level, logging.WARNING))
    quiet_transformers()
    if service:
        logging.getLogger("distzo").info("starting", extra={"fields": {"service": service, "pid": os.getpid()}})


def quiet_transformers() -> None:
    """Quiet transformers through its environment (read when it is imported: importing it here
    would cost every command seconds); if it is already loaded, tell it directly too."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a hub: everything is local
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if "transformers" in sys.modules:
        from transformers.utils import logging as tlog

        tlog.set_verbosity_error()
        tlog.disable_progress_bar()


def kv(**fields: object) -> dict[str, dict[str, object]]:
    """``log.info("msg", extra=kv(step=3))``"""
    return {"fields": fields}
