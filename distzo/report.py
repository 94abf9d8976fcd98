"""The run report: the training-loss and dev curves of a run directory, as a PNG and as text.

Reads the run log (``distzo.runlog``), so a run resumed after a restart is reported whole.
``zoctl up`` and ``zoctl reference --run-dir`` write ``report.png`` at the end; ``zoctl report
RUN_DIR`` prints the summary and draws it again.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from distzo.errors import counted
from distzo.runlog import EVALS, STEPS, RunHistory, mean_finite, read_history

PLOT = "report.png"


def _num(v: Any) -> float:
    return float(v) if isinstance(v, (int, float)) else math.nan


def eval_summary(evals: list[dict[str, Any]]) -> dict[str, Any]:
    """The zero-shot figures (the evaluation at step 0, when there is one) and every evaluation's
    step, dev loss and dev accuracy (``eval_history``)."""
    by_step = {int(e["step"]): e for e in evals}  # a resumed run that had ended evaluates its last step again
    out: dict[str, Any] = {"eval_history": [{"step": step, "dev_loss": _num(e["dev_loss"]),
                                             "dev_accuracy": _num(e["dev_accuracy"])} for step, e in by_step.items()]}
    first = next((e for e in evals if e["step"] == 0), None)
    if first is not None:
        out.update(zero_shot_dev_loss=_num(first["dev_loss"]), zero_shot_dev_accuracy=_num(first["dev_accuracy"]))
    return out


def start_loss(history: RunHistory) -> float:
    """The run's starting training loss: the mean over its first 10 logged steps (as TrainLog.start_loss)."""
    return mean_finite([_num(r.get("loss")) for r in history.steps[:10]])


def _moving_average(xs: list[float], window: int) -> list[float]:
    out, acc, n = [], 0.0, 0
    finite = [x if math.isfinite(x) else None for x in xs]
    for i, x in enumerate(finite):
        if x is not None:
            acc, n = acc + x, n + 1
        if i >= window and finite[i - window] is not None:
            acc, n = acc - finite[i - window], n - 1  # type: ignore[operator]
        out.append(acc / n if n else math.nan)
    return out


def plot(history: RunHistory, path: str | Path, title: str = "") -> Path:
    """Draw training loss (per step and its moving average) and dev accuracy/loss over steps."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4.2), constrained_layout=True)
    steps = [r["step"] for r in history.steps]
    losses = [_num(r.get("loss")) for r in history.steps]
    if steps:
        ax_loss.plot(steps, losses, color="tab:blue", alpha=0.25, linewidth=0.8, label="loss per step")
        window = max(1, len(steps) // 25)
        ax_loss.plot(steps, _moving_average(losses, window), color="tab:blue", linewidth=1.8,
                     label=f"moving average ({window} steps)")
        ax_loss.legend(loc="upper right")
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("training loss (label tokens, nats)")
    ax_loss.set_title("training loss")
    ax_loss.grid(alpha=0.3)

    ev_steps = [e["step"] for e in history.evals]
    ax_acc.plot(ev_steps, [_num(e.get("dev_accuracy")) for e in history.evals], "o-", color="tab:green", label="dev accuracy")
    ax_acc.set_xlabel("step")
    ax_acc.set_ylabel("dev accuracy", color="tab:green")
    ax_acc.set_title("dev split" + (f" ({history.evals[-1].get('dev_examples')} examples)" if history.evals else ""))
    ax_acc.grid(alpha=0.3)
    ax_dev = ax_acc.twinx()
    ax_dev.plot(ev_steps, [_num(e.get("dev_loss")) for e in history.evals], "s--", color="tab:red", alpha=0.7, label="dev loss")
    ax_dev.set_ylabel("dev loss (nats per label token)", color="tab:red")
    if title:
        fig.suptitle(title)
    out = Path(path)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _title(run_dir: Path) -> str:
    try:
        import yaml

        cfg = yaml.safe_load((run_dir / "job.yaml").read_text())
        t = cfg["train"]
        return (f"{cfg['model']['source']} on {cfg['data']['train'] or 'sst2-synth'}: "
                f"lr {t['lr']:g}, eps {t['eps']:g}, batch {t['batch_size']}, layout {cfg['layout']['name']}")
    except (OSError, KeyError, TypeError, ValueError):
        return run_dir.name


def write_report(run_dir: str | Path) -> dict[str, str]:
    """Draw ``report.png`` in the run directory; return where the log and the plot are."""
    d = Path(run_dir)
    plot(read_history(d), d / PLOT, _title(d))
    return {"step_log": str(d / STEPS), "eval_log": str(d / EVALS), "report": str(d / PLOT)}


def text_report(history: RunHistory) -> str:
    """A few lines a person reads after a run: steps, loss at start and end, every evaluation."""
    lines = []
    if history.steps:
        losses = [_num(r.get("loss")) for r in history.steps]
        tokens = sum(int(r.get("tokens") or 0) for r in history.steps)
        secs = history.elapsed_s
        lines.append(f"steps: {history.steps[0]['step']}..{history.steps[-1]['step']} ({len(history.steps)} logged), "
                     f"skipped {sum(1 for r in history.steps if r.get('skipped'))}")
        head, tail = mean_finite(losses[:10]), mean_finite(losses[-10:])
        n = min(10, len(losses))  # a shorter run's means are over all its steps: say so
        if math.isfinite(head) and math.isfinite(tail):
            lines.append(f"training loss: {head:.4f} (first {counted(n, 'step')}) -> {tail:.4f} (last {n})")
        if secs > 0:
            lines.append(f"training time: {secs:.1f} s, {tokens} tokens, {tokens / secs:.1f} tokens/s")
    else:
        lines.append("no training steps logged")
    if history.evals:
        lines.append(f"{'eval step':>10} {'dev loss':>10} {'dev accuracy':>13} {'examples':>9}")
        for e in history.evals:
            lines.append(f"{e['step']:>10} {_num(e.get('dev_loss')):>10.4f} {_num(e.get('dev_accuracy')):>13.4f} "
                         f"{e.get('dev_examples', ''):>9}")
    return "\n".join(lines)
