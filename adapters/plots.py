"""Figures people would rather look at than read: training curves and the attack ROC."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: workers and CI have no display
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from adapters.artifacts import atomic_path  # noqa: E402


def training_curves(history: Sequence[dict], target: Path) -> None:
    """Pooled test loss, accuracy and AUC per round, each client's test accuracy, the
    cumulative bytes on the wire against what dense float32 payloads would have cost, and
    (with DP-SGD) the ε spent so far."""
    rounds = [row["round"] for row in history]
    epsilon = [row.get("epsilon") for row in history]
    private = all(isinstance(e, int | float) for e in epsilon)
    fig, axes = plt.subplots(1, 4 if private else 3, figsize=(20 if private else 15, 4))
    ax_loss, ax_acc, ax_bytes = axes[:3]
    if private:
        _epsilon_panel(axes[3], rounds, epsilon)
    _loss_panel(ax_loss, rounds, history)
    _accuracy_panel(ax_acc, rounds, history)
    _bytes_panel(ax_bytes, rounds, history)
    for ax in (ax_loss, ax_acc, ax_bytes):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_acc.legend(fontsize=7, loc="lower right")
    fig.suptitle("Federated training")
    fig.tight_layout()
    _save(fig, target)


def _epsilon_panel(ax: plt.Axes, rounds: list[int], epsilon: list[float]) -> None:
    """The privacy spent so far: the largest ε of any client after each round."""
    ax.plot(rounds, epsilon, marker=".", color="tab:red")
    ax.set_xlabel("round")
    ax.set_ylabel("ε spent (per patient)")
    ax.set_ylim(0, None)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _loss_panel(ax: plt.Axes, rounds: list[int], history: Sequence[dict]) -> None:
    # NaN (no line) when the sites trained with DP-SGD: they do not release their loss
    ax.plot(rounds, [r["train_loss"] for r in history], label="train loss (clients; none under DP)")
    ax.plot(rounds, [r["test_loss"] for r in history], label="test loss (pooled)")
    ax.set_xlabel("round")
    ax.set_ylabel("binary cross-entropy")
    ax.legend()


def _accuracy_panel(ax: plt.Axes, rounds: list[int], history: Sequence[dict]) -> None:
    """Pooled accuracy and AUC, thick; each site's accuracy, thin (legend drawn by the caller)."""
    ax.plot(rounds, [r["accuracy"] for r in history], lw=2.5, label="accuracy (pooled)")
    ax.plot(rounds, [r["auc"] for r in history], lw=2.5, label="AUC (pooled)")
    # a site that failed a round's evaluation has no figure for it: a gap in its line
    for key in sorted({k for r in history for k in r if k.startswith("accuracy_")}):
        ax.plot(rounds, [r.get(key, float("nan")) for r in history], lw=0.8, alpha=0.7,
                label=key.removeprefix("accuracy_"))
    ax.set_xlabel("round")
    ax.set_ylim(0, 1)


def _bytes_panel(ax: plt.Axes, rounds: list[int], history: Sequence[dict]) -> None:
    for key, label in (("bytes_uploaded", "uploaded"), ("bytes_downloaded", "downloaded")):
        ax.plot(rounds, _cumulative(history, key), label=label)
        ax.plot(rounds, _cumulative(history, f"{key}_uncompressed"), ls="--",
                label=f"{label}, dense float32")
    ax.set_xlabel("round")
    ax.set_ylabel("cumulative bytes (all clients)")
    ax.legend(fontsize=7)


def _cumulative(history: Sequence[dict], key: str) -> list[float]:
    total, out = 0.0, []
    for row in history:
        total += float(row.get(key) or 0)
        out.append(total)
    return out


def roc_plot(curves: dict[str, tuple[Sequence[float], Sequence[float], float]], title: str,
             target: Path) -> None:
    """Membership-inference ROC curves (attack → (fpr, tpr, auc)) on log-log axes: the
    low-FPR region is what matters."""
    fig, ax = plt.subplots(figsize=(5.5, 5))
    floor = 1e-3
    for name, (fpr, tpr, auc) in curves.items():
        ax.loglog([max(f, floor) for f in fpr], [max(t, floor) for t in tpr],
                  label=f"{name} (AUC {auc:.3f})")
    ax.loglog([floor, 1], [floor, 1], "k--", lw=0.8, label="chance")
    ax.set_xlim(floor, 1)
    ax.set_ylim(floor, 1)
    ax.set_xlabel("false-positive rate")
    ax.set_ylabel("true-positive rate")
    ax.set_title(title)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    _save(fig, target)


def _save(fig: plt.Figure, target: Path) -> None:
    with atomic_path(target) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def privacy_utility_plot(points: Sequence[dict], baseline: dict, target: Path) -> None:
    """Pooled test accuracy (mean ± sd over seeds) against ε, with the non-private model."""
    fig, ax = plt.subplots(figsize=(6, 4))
    eps = [p["epsilon"] for p in points]
    mean = [p["accuracy_mean"] for p in points]
    sd = [p["accuracy_sd"] for p in points]
    ax.errorbar(eps, mean, yerr=sd, marker="o", capsize=3, label="patient-level DP-SGD")
    ax.axhline(baseline["accuracy_mean"], color="k", ls="--", lw=1,
               label=f"non-private (ε = ∞): {baseline['accuracy_mean']:.3f}")
    ax.axhspan(baseline["accuracy_mean"] - baseline["accuracy_sd"],
               baseline["accuracy_mean"] + baseline["accuracy_sd"], color="k", alpha=0.05,
               label="non-private ± sd over seeds")
    ax.set_xscale("log")
    ax.minorticks_off()
    ax.set_xticks(eps, [f"{e:g}" for e in eps])
    ax.set_xlabel("ε per patient (δ = 1e-5)")
    ax.set_ylabel("pooled test accuracy")
    ax.set_title("Privacy–utility")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    _save(fig, target)


def audit_sweep_plot(rows: Sequence[dict], rho: float, target: Path) -> None:
    """Worst-case attack AUC and TPR at 0.1 % FPR against ε (the largest ε at the right)."""
    labels = [f"{r['epsilon']:g}" for r in rows]
    pos = list(range(len(rows)))
    fig, (ax_auc, ax_tpr) = plt.subplots(1, 2, figsize=(10, 4))
    ax_auc.errorbar(pos, [r["mia_auc"] for r in rows], yerr=[r["mia_auc_sd"] for r in rows],
                    marker="o", capsize=3)
    ax_auc.axhline(0.5, color="k", ls="--", lw=0.8, label="chance")
    ax_auc.set_ylabel("attack AUC (worst case over attacks)")
    ax_auc.set_title(f"Membership inference vs ε (Spearman ρ = {rho:.2f})")
    ax_auc.legend(loc="upper left")
    ax_tpr.plot(pos, [r["mia_tpr_at_0_1pct_fpr"] for r in rows], marker="o", color="tab:red")
    ax_tpr.set_ylabel("TPR at 0.1 % FPR (worst case over attacks)")
    ax_tpr.set_ylim(0, max(0.1, 1.2 * max(r["mia_tpr_at_0_1pct_fpr"] for r in rows)))
    for ax in (ax_auc, ax_tpr):
        ax.set_xticks(pos, labels)
        ax.set_xlabel("ε per patient (δ = 1e-5)")
    fig.tight_layout()
    _save(fig, target)
