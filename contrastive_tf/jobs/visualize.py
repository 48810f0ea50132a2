"""Pictures: augmented views, training curves, neighbours, the embedding map,
and the pipeline's results (Markdown table, label-efficiency plot).

Every picture is a PNG (matplotlib, Agg backend; no display needed),
written atomically; the functions return its path.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from contrastive_tf.runtime.files import atomic_path


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path: str) -> str:
    plt = _pyplot()
    with atomic_path(path) as tmp:
        fig.savefig(tmp)
    plt.close(fig)
    return path


def _show(ax, image, title=None, colour=None):
    image = np.asarray(image, dtype=np.float32)
    if image.max() > 1.0:
        image = image / 255.0
    if image.shape[-1] == 1:
        ax.imshow(image[..., 0], cmap="gray", vmin=0, vmax=1)
    else:
        ax.imshow(np.clip(image, 0, 1))
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=8, color=colour or "black")
    if colour:
        for spine in ax.spines.values():
            spine.set_edgecolor(colour)
            spine.set_linewidth(3)


def view_grid(images, augmenter, path: str, pairs: int = 3,
              title: str = "SimCLR views") -> str:
    """Each row: an original image, then `pairs` positive pairs of views."""
    plt = _pyplot()
    images = np.asarray(images)
    rows = len(images)
    originals = augmenter(images, training=False).numpy()
    views = [(augmenter(images).numpy(), augmenter(images).numpy()) for _ in range(pairs)]
    fig, axes = plt.subplots(rows, 1 + 2 * pairs, figsize=(1.3 * (1 + 2 * pairs), 1.4 * rows),
                             dpi=100, squeeze=False)
    for r in range(rows):
        _show(axes[r, 0], originals[r], "original" if r == 0 else None)
        for p, (first, second) in enumerate(views):
            _show(axes[r, 1 + 2 * p], first[r], f"pair {p + 1}: view 1" if r == 0 else None)
            _show(axes[r, 2 + 2 * p], second[r], "view 2" if r == 0 else None)
    fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)


def training_curves(history: dict, path: str, title: str = "SimCLR pretraining") -> str:
    """Loss, contrastive accuracy, kNN accuracy and learning rate per epoch.

    `history` maps metric names to lists (Keras History.history), with an
    optional "knn" list of (step, accuracy) and "steps_per_point".
    """
    plt = _pyplot()
    panels = [("loss", "NT-Xent loss"), ("contrastive_accuracy", "contrastive accuracy"),
              ("knn", "kNN accuracy"), ("learning_rate", "learning rate")]
    fig, axes = plt.subplots(1, 4, figsize=(14, 3.2), dpi=100)
    step = history.get("steps_per_point", 1)
    for ax, (key, label) in zip(axes, panels):
        values = history.get(key) or []
        if key == "knn" and values:
            xs, ys = zip(*values)
        else:
            ys = values
            xs = [step * (i + 1) for i in range(len(ys))]
        if len(ys):
            ax.plot(xs, ys, "o-" if len(ys) < 30 else "-", markersize=3)
        else:
            ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(label)
        ax.set_xlabel("training step")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)


def neighbour_grid(query_images, query_labels, bank_images, bank_labels,
                   query_features, bank_features, class_names: Sequence[str],
                   path: str, neighbours: int = 8) -> str:
    """Each row: a query image and its nearest neighbours by cosine
    similarity; neighbours of another class are framed in red."""
    plt = _pyplot()
    q = query_features / np.linalg.norm(query_features, axis=1, keepdims=True)
    b = bank_features / np.linalg.norm(bank_features, axis=1, keepdims=True)
    nearest = np.argsort(-(q @ b.T), axis=1)[:, :neighbours]
    rows = len(query_images)
    fig, axes = plt.subplots(rows, neighbours + 1, figsize=(1.25 * (neighbours + 1), 1.45 * rows),
                             dpi=100, squeeze=False)
    for r in range(rows):
        _show(axes[r, 0], query_images[r], f"query: {class_names[query_labels[r]]}", "tab:blue")
        for c, index in enumerate(nearest[r]):
            same = bank_labels[index] == query_labels[r]
            _show(axes[r, c + 1], bank_images[index], class_names[bank_labels[index]],
                  None if same else "red")
    fig.suptitle("Nearest neighbours in the embedding (red frame: another class)")
    fig.tight_layout()
    return _save(fig, path)


def embedding_map(features, labels, class_names: Sequence[str], path: str,
                  title: str = "Test embeddings (PCA)") -> str:
    """A 2-D PCA projection of the features, coloured by class."""
    plt = _pyplot()
    centred = features - features.mean(axis=0, keepdims=True)
    _, _, components = np.linalg.svd(centred, full_matrices=False)
    points = centred @ components[:2].T
    fig, ax = plt.subplots(figsize=(7, 6), dpi=100)
    colours = plt.get_cmap("tab10")
    for label in np.unique(labels):
        chosen = labels == label
        ax.scatter(points[chosen, 0], points[chosen, 1], s=6, alpha=0.6,
                   color=colours(int(label) % 10), label=class_names[int(label)])
    ax.set_xlabel("principal component 1")
    ax.set_ylabel("principal component 2")
    ax.set_title(title)
    ax.legend(markerscale=3, fontsize=8, loc="best")
    fig.tight_layout()
    return _save(fig, path)


# -- the pipeline's results: table and label-efficiency plot ----------------

def _ordered_columns(results: dict) -> list[str]:
    """Column keys: label fractions in ascending order, then label counts."""
    keys = {k for method in results.values() for k in method}

    def order(key):
        try:
            return (0, float(key), key)
        except ValueError:
            return (1, 0.0, key)
    return sorted(keys, key=order)


def _column_header(key: str) -> str:
    try:
        return f"{float(key):.0%} labels"
    except ValueError:
        return key


def results_table(results: dict, spread: dict | None = None) -> str:
    """A Markdown table of {method: {column: accuracy}}: one row per method
    (in the dict's order), one column per label fraction
    (or labelled count); with `spread` over several label draws, each cell
    is the mean ± the standard deviation (in points)."""
    columns = _ordered_columns(results)
    header = "| method | " + " | ".join(_column_header(k) for k in columns) + " |"
    lines = [header, "|---|" + "---|" * len(columns)]
    for method in results:
        cells = []
        for key in columns:
            if key not in results.get(method, {}):
                cells.append("")
                continue
            cell = f"{results[method][key]:.2%}"
            draws = (spread or {}).get(method, {}).get(key)
            if draws and len(draws["values"]) > 1:
                cell += f" ± {100 * draws['std']:.2f}"
            cells.append(cell)
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_label_efficiency(results: dict, path: str, title: str,
                          spread: dict | None = None) -> str:
    """Accuracy against labelled fraction (log axis) for each method, with
    the standard deviation over label draws as error bars when given. A
    labelled count ("<n> labels") is placed at n on the axis."""
    plt = _pyplot()
    styles = {"supervised_baseline": ("supervised from scratch", "o-", "tab:gray"),
              "simclr_finetune": ("SimCLR fine-tuned", "s-", "tab:blue"),
              "linear_probe": ("SimCLR linear probe", "^--", "tab:green"),
              "knn": ("SimCLR kNN", "v:", "tab:olive"),
              "distilled_student": ("distilled student", "*", "tab:red")}
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)

    def position(key):
        try:
            return float(key)
        except ValueError:
            return float(key.split()[0])

    counts = any(not k.replace(".", "").isdigit() for m in results.values() for k in m)
    for method, (label, style, colour) in styles.items():
        points = sorted((position(k), v, (spread or {}).get(method, {}).get(k, {}).get("std", 0))
                        for k, v in results.get(method, {}).items())
        if points:
            xs, ys, errors = zip(*points)
            ax.errorbar(xs, [100 * y for y in ys], yerr=[100 * e for e in errors],
                        fmt=style, label=label, color=colour, capsize=3,
                        markersize=9 if method == "distilled_student" else 6)
    ax.set_xscale("log")
    ax.set_xlabel("labelled images" if counts else "fraction of training labels used")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    return _save(fig, path)


def plot_scaling(report: dict, path: str, family: str) -> str:
    """Two panels against encoder parameters (log axis): test accuracy of
    fine-tuning and of the supervised baseline, and the gain of one over the
    other, per labelled fraction, with the spread over label draws.
    `report`: experiments.scaling's {base width: {"parameters", "fractions":
    {fraction: {"simclr_finetune", "supervised_baseline", "gain"}}}}."""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4.2), dpi=120)
    widths = list(report)
    params = [report[w]["parameters"] / 1e6 for w in widths]
    fractions = sorted({f for row in report.values() for f in row["fractions"]}, key=float)
    names = {"simclr_finetune": ("SimCLR fine-tuned", "s-"),
             "supervised_baseline": ("supervised", "o--")}
    for fraction, colour in zip(fractions, ("tab:blue", "tab:orange", "tab:green")):
        labels = f"{100 * float(fraction):g}% labels"
        gains = [report[w]["fractions"][fraction]["gain"] for w in widths]
        right.errorbar(params, [g["mean"] for g in gains], yerr=[g["std"] for g in gains],
                       fmt="o-", color=colour, capsize=3, label=labels)
        for method, (name, style) in names.items():
            points = [report[w]["fractions"][fraction][method] for w in widths]
            left.errorbar(params, [100 * p["mean"] for p in points],
                          yerr=[100 * p["std"] for p in points], fmt=style, color=colour,
                          capsize=3, label=f"{name}, {labels}")
    for ax in (left, right):
        ax.set_xscale("log")
        ax.minorticks_off()
        ax.set_xticks(params, [f"{p:.2f} M\nwidth {w}" for p, w in zip(params, widths)])
        ax.set_xlabel(f"encoder parameters ({family})")
        ax.grid(True, alpha=0.3)
    left.set_ylabel("test accuracy (%)")
    left.set_title("accuracy by encoder size")
    left.legend(fontsize=7, loc="lower right")
    right.axhline(0, color="gray", linewidth=0.8)
    right.set_ylabel("fine-tuned minus supervised (points)")
    right.set_title("gain over supervised by encoder size")
    right.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)
