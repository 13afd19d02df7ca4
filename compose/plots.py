"""PNG plots of an evaluation report: reward vs KL (VAS and Best-of-N) per head, and a two-head front."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


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
    sweep = sorted((s for s in report["settings"]
                    if all(b == 0 for h, b in s["weights"].items() if h != head)),
                   key=lambda s: s["weights"][head])
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
