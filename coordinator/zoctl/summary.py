"""What zoctl prints about a run: the end-of-run summary, the progress bar, a job's status.

Light on purpose (no torch, no pydantic): ``zoctl status`` imports it and starts in well under
a second.
"""

from __future__ import annotations

import math
import sys
import time
from typing import Any

from coordinator.zoctl.common import print_json, strict_json
from distzo.common.errors import counted

SUMMARY_KEYS = ("mode", "model", "task", "layout", "workers", "state", "steps", "zero_shot_dev_loss",
                "zero_shot_dev_accuracy", "start_loss", "final_loss", "dev_loss", "dev_accuracy", "dev_accuracy_change",
                "tokens_per_second", "wall_seconds", "skipped_steps", "out_dir", "step_log", "eval_log", "report",
                "perturbation", "perturbation_warning")


def print_summary(summary: dict[str, Any], as_json: bool) -> None:
    """The end of a run: one ``key: value`` line per summary key, then the eval history (or all of it as JSON)."""
    if as_json:
        print_json(summary)
        return
    for key in SUMMARY_KEYS:
        if key in summary and summary[key] is not None:
            v = summary[key]
            if key == "dev_accuracy_change":
                print(f"{key:>22}: {_change_text(v, summary.get('dev_accuracy_change_se'))}")
                continue
            print((f"{key:>22}: {v:.4f}" if isinstance(v, float) else f"{key:>22}: {v}") + _loss_window_note(summary, key))
    history = summary.get("eval_history") or []
    if history:
        print(f"{'evaluations':>22}: {'step':>6} {'dev loss':>10} {'dev accuracy':>13}")
        for e in history:
            print(f"{'':>22}  {e['step']:>6} {e['dev_loss']:>10.4f} {e['dev_accuracy']:>13.4f}")
    net = summary.get("network")
    if net:  # zoctl up --hosts: bytes on each host's link (coordinator.cluster.linkstats)
        print(f"{'model_bytes':>22}: {net['model_bytes']} (one copy at the served dtype)")
        for link in net["links"]:
            sync = link["initial_sync_bytes"]
            if not net["steady_steps"]:  # every sampled interval held an eval, the start or the last step
                print(f"{'link host-' + str(link['host']):>22}: no steady-state interval was sampled (run more steps)"
                      + (f"; initial sync {sync} bytes" if sync is not None else ""))
                continue
            print(f"{'link host-' + str(link['host']):>22}: {link['bytes_per_step']:.0f} bytes/step "
                  f"(sent {link['sent_bytes_per_step']:.0f}, received {link['received_bytes_per_step']:.0f}; "
                  f"{100 * link['fraction_of_model']:.3f}% of the model; steady state over {net['steady_steps']} steps)"
                  + (f", initial sync {sync} bytes" if sync is not None else ""))


def _change_text(change: float, se: Any) -> str:
    """The dev accuracy's change since step 0 with its standard error, and what it is: a gain, a drop, or noise."""
    if not isinstance(se, float) or not math.isfinite(se) or not math.isfinite(change):
        return f"{change:+.4f}"
    verdict = ("within noise (under 2 standard errors)" if abs(change) < 2 * se
               else "a gain" if change > 0 else "a drop")
    return f"{change:+.4f}, standard error {se:.4f}: {verdict}"


def _loss_window_note(summary: dict[str, Any], key: str) -> str:
    """Which steps the start and final training loss average (``loss_window``), said where it matters: a run of
    fewer than 20 steps averages fewer than 10, and a 1-step run's two figures are the same step."""
    window, steps = summary.get("loss_window"), summary.get("steps")
    if key not in ("start_loss", "final_loss") or not isinstance(window, int) or not isinstance(steps, int) or steps < 1:
        return ""
    if steps == 1:
        return " (the run's one step: start and final loss are the same step)"
    first, last = (0, window - 1) if key == "start_loss" else (steps - window, steps - 1)
    return f" (mean of steps {first}-{last})" if first != last else f" (step {first})"


def summary_from_status(st, wall: float, out_dir: str | None, extra: dict[str, Any]) -> dict[str, Any]:  # noqa: ANN001
    """The summary of a distributed run from the coordinator's final ``JobStatus`` (``extra``: run-log figures)."""
    from distzo.run.report import eval_summary

    last = st.evals[-1] if st.evals and st.evals[-1].step == st.step else None  # never an older eval's figures
    return {
        "mode": "distributed",
        "model": st.model,
        "layout": st.layout,
        "workers": st.layout_workers,
        "state": st.state,
        "steps": st.step,
        **eval_summary([{"step": e.step, "dev_loss": e.dev_loss, "dev_accuracy": e.dev_accuracy,
                         "dev_examples": e.dev_examples} for e in st.evals]),
        "final_loss": st.final_loss,
        "dev_loss": last.dev_loss if last else math.nan,
        "dev_accuracy": last.dev_accuracy if last else math.nan,
        "skipped_steps": st.skipped_steps,
        "train_tokens": st.train_tokens,
        "tokens_per_second": st.tokens_per_second,
        "wall_seconds": wall,
        "out_dir": out_dir,
        "reassignments": st.reassignments,
        "late_reports": st.late_reports,
        "resumed_from": st.resumed_from,
        "perturbation": st.perturbation or None,
        "perturbation_warning": st.perturbation_warning or None,
        **extra,
    }


def _shown_state(st) -> str:  # noqa: ANN001 - a JobStatus
    """The job's state as a person reads it: "evaluating" (the dev split, after step N) while it evaluates."""
    activity = getattr(st, "activity", "")
    return f"{activity} (dev split)" if activity and st.state in ("running", "paused", "stopping") else st.state


class ProgressBar:
    """A progress bar on stderr; a line on each change of state (at most every 5 s while steps advance)
    when stderr is not a terminal.

    The bar is drawn at the first update, not before: the start-up lines printed between creating it
    and the first step would otherwise be written through it.
    """

    def __init__(self, total: int, enabled: bool = True):
        self.tty = sys.stderr.isatty()
        self.enabled = enabled
        self.total = total
        self.bar = None
        self.last_line = (0.0, "", -1)  # when, state, step of the last plain line
        self.done = 0
        self.announced = False

    def note(self, line: str) -> None:
        """A line on stderr that does not break the bar."""
        if self.bar is not None:
            self.bar.write(line, file=sys.stderr)
        else:
            print(line, file=sys.stderr, flush=True)

    def update(self, st) -> None:  # noqa: ANN001 - a JobStatus
        self.total = st.total_steps or self.total
        loss = f"{st.loss:.4f}" if math.isfinite(st.loss) else "-"
        if not self.enabled:
            return
        if st.perturbation and not self.announced:  # measured at the job's start: said once, warning included
            self.announced = True
            self.note(f"zoctl: {st.perturbation}")
            if st.perturbation_warning:
                self.note(f"zoctl: {st.perturbation_warning}")
        state = _shown_state(st)
        if not self.tty:
            when, last_state, step = self.last_line
            if state != last_state or (st.step != step and time.monotonic() - when > 5):
                print(f"zoctl: {state} step {st.step}/{st.total_steps} loss {loss} tokens/s {st.tokens_per_second:.0f}",
                      file=sys.stderr, flush=True)
                self.last_line = (time.monotonic(), state, st.step)
            return
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=self.total, desc="training", unit="step", file=sys.stderr)
        self.bar.total = self.total
        if st.step > self.done:
            self.bar.update(st.step - self.done)
            self.done = st.step
        self.bar.set_postfix_str(f"{state} loss={loss} tok/s={st.tokens_per_second:.0f}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


# ----------------------------------------------------------------------------- status
def status_dict(st) -> dict[str, Any]:  # noqa: ANN001
    """A reply as a JSON-ready dict: 64-bit integers as numbers and non-finite floats as null (protobuf's
    JSON would write the strings "123" and "NaN")."""
    from google.protobuf.json_format import MessageToDict

    return _typed_fields(st, MessageToDict(st, preserving_proto_field_name=True, always_print_fields_with_no_presence=True))


def _typed_fields(msg, out: dict[str, Any]) -> dict[str, Any]:  # noqa: ANN001
    from google.protobuf.descriptor import FieldDescriptor as F

    int64 = (F.TYPE_INT64, F.TYPE_UINT64, F.TYPE_SINT64, F.TYPE_FIXED64, F.TYPE_SFIXED64)
    for field in msg.DESCRIPTOR.fields:
        if field.name not in out:
            continue
        value = getattr(msg, field.name)
        repeated = field.is_repeated
        if field.type in (F.TYPE_DOUBLE, F.TYPE_FLOAT):
            out[field.name] = [strict_json(float(v)) for v in value] if repeated else strict_json(float(value))
        elif field.type in int64:
            out[field.name] = [int(v) for v in value] if repeated else int(value)
        elif field.type == F.TYPE_MESSAGE and not field.message_type.GetOptions().map_entry:
            if repeated:
                for sub, sub_out in zip(value, out[field.name]):
                    _typed_fields(sub, sub_out)
            else:
                _typed_fields(value, out[field.name])
    return out


def print_status(st, as_json: bool) -> None:  # noqa: ANN001
    """A job's state, its last eval and its workers (a ``JobStatus``), as text or JSON."""
    if as_json:
        print_json(status_dict(st))
        return
    loss = f"{st.loss:.4f}" if math.isfinite(st.loss) else "-"
    print(f"job: {_shown_state(st)}  step {st.step}/{st.total_steps}  loss {loss}  tokens/s {st.tokens_per_second:.0f}  "
          f"layout {st.layout} with {counted(st.layout_workers, 'worker')}  skipped {st.skipped_steps}  "
          f"reassigned {st.reassignments}")
    if st.error:
        print(f"error: {st.error}")
    for line in (st.perturbation, st.perturbation_warning):
        if line:
            print(line)
    if st.evals:
        e = st.evals[-1]
        print(f"last eval: step {e.step}  dev loss {e.dev_loss:.4f}  dev accuracy {e.dev_accuracy:.3f}")
    print(f"{'worker':<16} {'state':<7} {'pid':>8} {'node':<12} {'done':>6} {'seen':>6}")
    for w in st.workers:
        print(f"{w.worker_id:<16} {w.state:<7} {w.pid:>8} {w.node_id[:12]:<12} {w.assignments_done:>6} {w.last_seen_s:>5.1f}s")
