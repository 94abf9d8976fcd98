"""What every zoctl command shares: exit codes, the bad-input error, strict JSON output.

Exit codes: 0 done; 1 the run failed; 2 bad input (usage, config, model, data); 3 a
service could not be reached; 130 interrupted; 141 the output was closed. Light on purpose (no torch, no pydantic):
status and control commands start in well under a second.
"""

from __future__ import annotations

import json
from typing import Any

from distzo.strictjson import strict_json  # noqa: F401 - re-exported for the commands

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_UNREACHABLE, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, what a shell reports for a writer whose reader has gone


class CliError(Exception):
    """A command's error: zoctl prints the message on one line and exits with ``code``."""

    def __init__(self, message: str, code: int = EXIT_BAD_INPUT):
        super().__init__(message)
        self.code = code


def print_json(value: Any, indent: int | None = 2) -> None:
    """Machine-readable output: strict JSON (non-finite numbers as null)."""
    print(json.dumps(strict_json(value), indent=indent, sort_keys=True, allow_nan=False))
