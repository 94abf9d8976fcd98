"""The restart policy of the supervisors: ``zoctl up``'s local cluster (coordinator/cluster/local.py) and
``distzo-worker-launch`` (gpuworker/launch.py). What is restarted, and how, is theirs; when, how
long to wait first and when to give up is written here once.

The rule: a process (or a node group, restarted whole) that dies is restarted, except

* one that refused its input (exit code 2, ``EXIT_BAD_INPUT``: a bad flag, config or data
  directory) would fail the same way every time: it is not restarted;
* one restarted ``max_restarts`` times already (when the supervisor sets a limit) is in a crash
  loop: the supervisor gives up.

A death less than ``stable_s`` after the start is *quick*: the k-th quick death in a row waits
``delay(k)`` before the restart (exponential or linear growth up to a cap), so a crash loop does not
spin; a death after a run of ``stable_s`` or more is a fresh failure: restarted after
``min_delay_s`` (0 unless set), and the backoff starts over.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

from distzo.infra.procs import ServiceFailed

EXIT_BAD_INPUT = 2  # a service refusing its input fails the same way every time: never restarted


@dataclass(frozen=True)
class RestartPolicy:
    """When to restart, after how long, and when to give up.

    ``first_delay_s``: the wait after the first quick death; then ``growth`` "exponential" (x2 per
    quick death in a row) or "linear" (+``first_delay_s``), capped at ``max_delay_s`` (seconds).
    ``stable_s``: a run at least this long (seconds) ends a crash loop. ``max_restarts``: restarts
    of one unit over the supervisor's life before it gives up (None: never). ``min_delay_s``: the
    least wait before any restart, also after a stable run (a node group's ports and GPU memory are
    let go first)."""

    first_delay_s: float
    max_delay_s: float
    stable_s: float
    max_restarts: int | None = None
    growth: str = "exponential"
    min_delay_s: float = 0.0

    def __post_init__(self) -> None:
        if self.growth not in ("exponential", "linear"):
            raise ValueError(f"growth must be 'exponential' or 'linear', got {self.growth!r}")

    def delay(self, quick_deaths: int) -> float:
        """Seconds to wait before restarting after the ``quick_deaths``-th quick death in a row (0: at once)."""
        if quick_deaths <= 0:
            return self.min_delay_s
        grown = 2.0 ** (quick_deaths - 1) if self.growth == "exponential" else float(quick_deaths)
        return max(self.min_delay_s, min(self.max_delay_s, self.first_delay_s * grown))

    def restartable(self, exc: BaseException) -> bool:
        """Whether a failed start (``ServiceFailed``) may be tried again: not when it refused its input.
        For tenacity's ``retry_if_exception``."""
        return isinstance(exc, ServiceFailed) and exc.code != EXIT_BAD_INPUT

    def wait(self, retry_state) -> float:  # noqa: ANN001 - tenacity's RetryCallState
        """tenacity's ``wait``: the n-th failed start in a row waits ``delay(n)``."""
        return self.delay(retry_state.attempt_number)


@dataclass
class Restarts:
    """The restart record of one supervised unit (a process, or a node group) under ``policy``."""

    name: str
    policy: RestartPolicy
    count: int = 0  # restarts over the supervisor's life
    quick_deaths: int = 0  # quick deaths in a row

    def died(self, codes: int | None | Iterable[int | None], ran_s: float, tail: str | Callable[[], str] = "") -> float:
        """Record a death after ``ran_s`` seconds with exit code(s) ``codes`` (a node group's members:
        one each; None: unknown); returns the seconds to wait before restarting it.

        Raises ServiceFailed (code 2) when it refused its input, and ServiceFailed (its exit code)
        when this restart would exceed ``max_restarts``; both messages end with ``tail`` (its log's
        last lines, or a function giving them)."""
        codes = [codes] if codes is None or isinstance(codes, int) else list(codes)
        shown = ",".join(str(c) for c in codes)
        if EXIT_BAD_INPUT in codes:
            raise ServiceFailed(f"{self.name} refused its input (exit code {shown}); not restarting it"
                                + _tail(tail), EXIT_BAD_INPUT)
        self.count += 1
        limit = self.policy.max_restarts
        if limit is not None and self.count > limit:
            raise ServiceFailed(f"{self.name} keeps dying (exit code {shown}, {limit} restarts)" + _tail(tail),
                                next((c for c in codes if c), codes[0]))
        self.quick_deaths = self.quick_deaths + 1 if ran_s < self.policy.stable_s else 0
        return self.policy.delay(self.quick_deaths)

    def failed_start(self) -> None:
        """Count a start that failed and is tried again (its wait comes from ``policy.wait``)."""
        self.count += 1

    @property
    def starts_left(self) -> int:
        """Start attempts left before ``max_restarts`` is reached (at least 1: the start itself)."""
        if self.policy.max_restarts is None:
            return 1 << 30
        return max(1, self.policy.max_restarts - self.count + 1)


def _tail(tail: str | Callable[[], str]) -> str:
    text = tail() if callable(tail) else tail
    return f":\n{text}" if text else ""
