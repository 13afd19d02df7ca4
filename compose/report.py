"""An evaluation report, written and shown: report.json, PNG plots, Markdown tables, and the results recorded in heads.

    report = evaluate(base, tokenizer, bank, prompts, rewards, config)
    files = write_report(report, "runs/eval")            # report.json + reward_vs_kl_<head>.png (+ pareto)
    print(report_text(report, files))                    # the summary and each head's sweep
    record_in_heads(bank, report, {"short": "runs/heads/short"})

`valuemix eval` and the recipes' pipeline both go through these functions.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from valuemix.compose.evaluate import head_evaluation, own_settings  # noqa: E402
from valuemix.heads.atomic import atomic_directory  # noqa: E402


def write_report(report: dict, out) -> list[Path]:
    """Add each head's sweep table (`report["sweeps"]`), then write report.json and the plots into `out` atomically.

    Returns the files written, report.json first.
    """
    report["sweeps"] = sweeps(report)
    with atomic_directory(out) as tmp:
        Path(tmp, "report.json").write_text(json.dumps(report, indent=1), encoding="utf-8")
        plots = plot_report(report, tmp)
    return [Path(out, "report.json")] + [Path(out, p.name) for p in plots]


def report_text(report: dict, files: list[Path] = ()) -> str:
    """The summary table, every head's sweep, and which files were written."""
    parts = [summary_table(report)]
    parts += [f"{head}: every reward and measure at each β\n{sweep_table(report, head)}" for head in report["sweeps"]]
    if files:
        parts.append(f"Wrote {Path(files[0]).parent}/{', '.join(Path(f).name for f in files)}")
    return "\n\n".join(parts)


def record_in_heads(bank, report: dict, folders: dict) -> list[str]:
    """Write each evaluated head's measurements into its folder's head_config.json and model card.

    folders: head -> its local folder (heads loaded from Hub ids are left out: their cache is read-only).
    Returns one line per head saying what was recorded, or why not.
    """
    lines = []
    for head in report["summary"]:
        if head not in folders:
            lines.append(f"Not recorded for {head}: it was not loaded from a local folder (a Hub id's cache is "
                         "read-only).")
            continue
        bank.configs[head] = replace(bank.configs[head], evaluation=head_evaluation(report, head))
        bank.save_head(head, folders[head])
        low, high = bank.configs[head].evaluation["working_beta_range"]
        lines.append(f"Recorded in {folders[head]}: β from {low:g} to {high:g} worked for {head}")
    return lines


def sweeps(report: dict) -> dict:
    """Per head, its own β sweep (the other heads at 0): rows of β, KL (nats) and every reward's mean."""
    table = {}
    for head in report["heads"]:
        own = own_settings(report["settings"], head)
        table[head] = sorted(({"beta": s["weights"][head], "kl": s["kl"], **s["rewards"]} for s in own),
                             key=lambda row: row["beta"])
    return table


def sweep_table(report: dict, head: str) -> str:
    """A Markdown table of one head's sweep: β, KL and every reward's mean."""
    rows = report["sweeps"][head]
    names = [k for k in rows[0] if k not in ("beta", "kl")]
    lines = ["| β | KL | " + " | ".join(names) + " |", "|---:|---:|" + "---:|" * len(names)]
    lines += [f"| {r['beta']:g} | {r['kl']:.2f} | " + " | ".join(f"{r[n]:.3f}" for n in names) + " |" for r in rows]
    return "\n".join(lines)


def summary_table(report: dict) -> str:
    """A Markdown table: per head, the largest Best-of-N VAS reaches, at what KL and cost, and the gain.

    Mean rewards are shown ± their standard error over prompts.
    """
    lines = ["| head | base reward | BoN-16 reward | largest BoN reached | β | VAS reward | VAS KL | VAS s/completion | "
             "BoN s/completion | gain at BoN-16 KL |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for head, s in report["summary"].items():
        start = (f"| {head} | {_with_error(s['base_reward'], s.get('base_reward_se'))} | "
                 f"{_with_error(s.get('best_of_16_reward'), s.get('best_of_16_reward_se'))} |")
        if "largest_best_of_n_reached" in s:
            lines.append(f"{start} {s['largest_best_of_n_reached']} | {s['beta']:g} | "
                         f"{_with_error(s['vas_reward'], s.get('vas_reward_se'))} | {s['vas_kl']:.2f} | "
                         f"{s['vas_seconds']:.3f} | {s['best_of_n_seconds']:.3f} | {s['gain_at_best_of_16_kl']:+.3f} |")
        else:
            lines.append(f"{start} none | | | | | | {s['gain_at_best_of_16_kl']:+.3f} |")
    return "\n".join(lines)


def _with_error(value: float | None, se: float | None) -> str:
    """"0.583 ± 0.031" (or the value alone without a standard error; blank without a value)."""
    if value is None:
        return ""
    return f"{value:.3f}" if se is None else f"{value:.3f} ± {se:.3f}"


def plot_report(report: dict, out_dir) -> list[Path]:
    """Write `reward_vs_kl_<head>.png` per head (and `pareto_<a>_<b>.png` for a grid); return the paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [_reward_vs_kl(report, head, out_dir) for head in report["heads"] if head in report["best_of_n"]]
    grid = report["config"].get("grid_heads")
    if grid:
        paths.append(_pareto(report, *grid, out_dir))
    return paths


def _reward_vs_kl(report: dict, head: str, out_dir: Path) -> Path:
    sweep = sorted(own_settings(report["settings"], head), key=lambda s: s["weights"][head])
    curve = report["best_of_n"][head]
    fig, ax = plt.subplots(figsize=(6, 4.2))
    ax.errorbar([p["kl"] for p in curve], [p["reward"] for p in curve], yerr=[p.get("reward_se", 0) for p in curve],
                fmt="s--", color="tab:gray", capsize=3, label="Best-of-N (± standard error over prompts)")
    for p in curve:
        ax.annotate(f"N={p['n']}", (p["kl"], p["reward"]), textcoords="offset points", xytext=(4, -10), fontsize=7)
    ax.errorbar([s["kl"] for s in sweep], [s["rewards"][head] for s in sweep],
                yerr=[s.get("reward_se", {}).get(head, 0) for s in sweep], fmt="o-", color="tab:blue", capsize=3,
                label="valuemix (VAS)")
    for s in sweep:
        ax.annotate(f"β={s['weights'][head]:g}", (s["kl"], s["rewards"][head]), textcoords="offset points",
                    xytext=(4, 4), fontsize=7, color="tab:blue")
    ax.set(xlabel="KL(π ‖ π_ref) per completion (nats)", ylabel=f"mean reward: {head}",
           title=f"{head}: reward vs KL")
    return _finish(fig, ax, out_dir / f"reward_vs_kl_{head}.png")


def _pareto(report: dict, a: str, b: str, out_dir: Path) -> Path:
    points = [s for s in report["settings"] if all(v == 0 for h, v in s["weights"].items() if h not in (a, b))]
    xs, ys = [s["rewards"][a] for s in points], [s["rewards"][b] for s in points]
    front = sorted((p for p in zip(xs, ys) if not any(q[0] >= p[0] and q[1] >= p[1] and q != p
                                                     for q in zip(xs, ys))))
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    ax.scatter(xs, ys, color="tab:blue")
    for s, x, y in zip(points, xs, ys):
        ax.annotate(f"({s['weights'][a]:g}, {s['weights'][b]:g})", (x, y), textcoords="offset points",
                    xytext=(4, 4), fontsize=7)
    ax.plot(*zip(*front), "-", color="tab:orange", label="Pareto front")
    ax.set(xlabel=f"mean reward: {a}", ylabel=f"mean reward: {b}", title=f"Mixing {a} and {b}: (β_{a}, β_{b})")
    return _finish(fig, ax, out_dir / f"pareto_{a}_{b}.png")


def _finish(fig, ax, path: Path) -> Path:
    """Grid, legend, tight layout; save as PNG and free the figure."""
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
