"""The run report: the training-loss and dev curves of a run directory, as a PNG and as text.

Reads the run log (``distzo.run.runlog``), so a run resumed after a restart is reported whole.
``zoctl up`` and ``zoctl reference --run-dir`` write ``report.png`` at the end; ``zoctl report
RUN_DIR`` prints the summary and draws it again.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from distzo.common.errors import counted
from distzo.run.runlog import EVALS, STEPS, RunHistory, loss_window, mean_finite, read_history

PLOT = "report.png"


def _num(v: Any) -> float:
    return float(v) if isinstance(v, (int, float)) else math.nan


def accuracy_se(accuracy: float, examples: Any) -> float:
    """The standard error of an accuracy measured on ``examples`` examples: sqrt(p (1 - p) / n)."""
    if not isinstance(examples, int) or examples <= 0 or not math.isfinite(accuracy):
        return math.nan
    return math.sqrt(accuracy * (1 - accuracy) / examples)


def eval_summary(evals: list[dict[str, Any]]) -> dict[str, Any]:
    """The zero-shot figures (the evaluation at step 0, when there is one), every evaluation's step, dev loss
    and dev accuracy (``eval_history``), and the change of dev accuracy from step 0 to the last evaluation with
    its standard error (``dev_accuracy_change``, ``dev_accuracy_change_se``: the two evaluations' standard
    errors combined as if independent, an upper bound for the same examples evaluated twice)."""
    by_step = {int(e["step"]): e for e in evals}  # a resumed run that had ended evaluates its last step again
    out: dict[str, Any] = {"eval_history": [{"step": step, "dev_loss": _num(e["dev_loss"]),
                                             "dev_accuracy": _num(e["dev_accuracy"])} for step, e in by_step.items()]}
    first = by_step.get(0)
    if first is not None:
        out.update(zero_shot_dev_loss=_num(first["dev_loss"]), zero_shot_dev_accuracy=_num(first["dev_accuracy"]))
        last = by_step[max(by_step)]
        if max(by_step) > 0:
            a0, a1 = _num(first["dev_accuracy"]), _num(last["dev_accuracy"])
            se0, se1 = accuracy_se(a0, first.get("dev_examples")), accuracy_se(a1, last.get("dev_examples"))
            out.update(dev_accuracy_change=a1 - a0, dev_accuracy_change_se=math.sqrt(se0 ** 2 + se1 ** 2))
    return out


def start_loss(history: RunHistory) -> float:
    """The run's starting training loss: the mean over its first ``loss_window`` logged steps (as TrainLog.start_loss)."""
    return mean_finite([_num(r.get("loss")) for r in history.steps[:loss_window(len(history.steps))]])


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
    """Three panels: the training loss (per step and its moving average), the dev accuracy (each evaluation
    with its standard error, the zero-shot level as a line) and the dev loss (likewise), each on its own axis."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc, ax_dev) = plt.subplots(1, 3, figsize=(15, 4.2), constrained_layout=True)
    steps = [r["step"] for r in history.steps]
    losses = [_num(r.get("loss")) for r in history.steps]
    if steps:
        window = len(steps) // 25
        ax_loss.plot(steps, losses, color="tab:blue", alpha=0.25 if window > 1 else 1.0, linewidth=0.8,
                     marker="." if window <= 1 else None, label="loss per step")
        if window > 1:
            ax_loss.plot(steps, _moving_average(losses, window), color="tab:blue", linewidth=1.8,
                         label=f"moving average ({window} steps)")
        ax_loss.legend(loc="upper right")
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("training loss (nats; train.objective's)")
    ax_loss.set_title("training loss")
    ax_loss.grid(alpha=0.3)

    evals = sorted({int(e["step"]): e for e in history.evals}.items())  # one point per step (a resume re-evaluates)
    ev_steps = [step for step, _ in evals]
    acc = [_num(e.get("dev_accuracy")) for _, e in evals]
    se = [accuracy_se(a, e.get("dev_examples")) for a, (_, e) in zip(acc, evals)]
    dev_loss = [_num(e.get("dev_loss")) for _, e in evals]
    examples = {e.get("dev_examples") for _, e in evals}
    n = f" ({examples.pop()} examples)" if len(examples) == 1 else ""
    ax_acc.errorbar(ev_steps, acc, yerr=[0 if math.isnan(x) else x for x in se], fmt="o-", color="tab:green",
                    capsize=4, markersize=6, label="dev accuracy ± standard error")
    ax_dev.plot(ev_steps, dev_loss, "s-", color="tab:red", markersize=6, label="dev loss")
    if ev_steps and ev_steps[0] == 0:  # the zero-shot level, to read a change against
        ax_acc.axhline(acc[0], color="gray", linestyle="--", linewidth=1, label=f"zero-shot {acc[0]:.3f}")
        ax_dev.axhline(dev_loss[0], color="gray", linestyle="--", linewidth=1, label=f"zero-shot {dev_loss[0]:.3f}")
    for ax, name in ((ax_acc, "dev accuracy"), (ax_dev, "dev loss (nats)")):
        ax.set_xlabel("step")
        ax.set_ylabel(name)
        ax.set_title(f"{name.split(' (')[0]}{n}")
        ax.grid(alpha=0.3)
        if steps or ev_steps:
            ax.set_xlim(-0.03 * max(steps + ev_steps + [1]), 1.03 * max(steps + ev_steps + [1]))
        if ev_steps:
            ax.legend(loc="best")
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
        objective = f", objective {t['objective']}" if t.get("objective", "loss") != "loss" else ""
        return (f"{cfg['model']['source']} on {cfg['data']['train'] or 'sst2-synth'}: "
                f"lr {t['lr']:g}, eps {t['eps']:g}, batch {t['batch_size']}{objective}, layout {cfg['layout']['name']}")
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
        n = loss_window(len(losses))  # a shorter run's means are over fewer steps: say so
        head, tail = mean_finite(losses[:n]), mean_finite(losses[-n:])
        if math.isfinite(head) and math.isfinite(tail):
            lines.append(f"training loss: {head:.4f} (first {counted(n, 'step')}) -> {tail:.4f} (last {n})"
                         + (" (a 1-step run: the same step)" if len(losses) == 1 else ""))
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
