"""Reports: Markdown tables and PNG plots (matplotlib, headless)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

from .distill.augment import ig_overlay
from .fileio import atomic_path


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def markdown_table(header: list[str], rows: list[list]) -> str:
    def cell(v):
        if isinstance(v, float):
            return f"{v:.2f}"
        if isinstance(v, int):
            return f"{v:,}"
        return str(v)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def overlay_examples(images: torch.Tensor, maps: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """The overlay the student would see with p = 1 (uint8 images, maps N x H x W)."""
    gen = torch.Generator().manual_seed(seed)
    return ig_overlay(images.float() / 255, maps.float(), 1.0, gen)


def gallery(path: str | Path, images: torch.Tensor, maps: torch.Tensor, labels: list[str],
            title: str = "teacher IG maps and overlays") -> Path:
    """A PNG with one column per image: the image, its IG map (sum_c |IG|), its overlay."""
    plt = _plt()
    n = len(images)
    over = overlay_examples(images, maps)
    fig, axes = plt.subplots(3, n, figsize=(1.3 * n, 4.4), squeeze=False)
    gray = images.shape[1] == 1
    for j in range(n):
        img = images[j].permute(1, 2, 0).numpy()
        ov = over[j].permute(1, 2, 0).clamp(0, 1).numpy()
        panels = [(img[..., 0] if gray else img, "gray" if gray else None),
                  (maps[j].float().numpy(), "inferno"),
                  (ov[..., 0] if gray else ov, "gray" if gray else None)]
        for i, (data, cmap) in enumerate(panels):
            ax = axes[i, j]
            ax.imshow(data, cmap=cmap, vmin=0 if cmap == "gray" else None, vmax=(255 if data.dtype == np.uint8
                      else 1) if cmap == "gray" else None, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
        axes[0, j].set_title(labels[j], fontsize=8)
    for i, name in enumerate(["image", "IG map", "overlay"]):
        axes[i, 0].set_ylabel(name, fontsize=9)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def training_curves(path: str | Path, histories: dict[str, list[dict]]) -> Path:
    """Validation accuracy and training loss per epoch, one line per run."""
    plt = _plt()
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.4))
    for name, hist in histories.items():
        ep = [r["epoch"] for r in hist]
        a.plot(ep, [r["val_accuracy"] for r in hist], marker="o", ms=3, label=name)
        b.plot(ep, [r["loss"] for r in hist], marker="o", ms=3, label=name)
    a.set_xlabel("epoch")
    a.set_ylabel("validation accuracy (%)")
    b.set_xlabel("epoch")
    b.set_ylabel("training loss")
    a.legend()
    a.grid(alpha=0.3)
    b.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def accuracy_bars(path: str | Path, names: list[str], accuracies: list[float], reference: float | None = None,
                  errors: list[tuple[float, float]] | None = None) -> Path:
    """Bars of test accuracy, the teacher as a dashed line; ``errors`` gives (below, above)
    error-bar lengths per bar (e.g. a confidence interval)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(1.2 * len(names) + 2, 3.2))
    yerr = np.array(errors, dtype=float).T if errors else None
    ax.bar(names, accuracies, color="#4c72b0", yerr=yerr, capsize=4 if errors else 0)
    if reference is not None:
        ax.axhline(reference, color="k", ls="--", lw=1, label="teacher")
        ax.legend()
    lows = [v - (e[0] if errors else 0) for v, e in zip(accuracies, errors or [(0, 0)] * len(accuracies))]
    lo = min(lows + ([reference] if reference is not None else []))
    ax.set_ylim(max(0, math.floor(lo - 5)), 100)
    for i, v in enumerate(accuracies):
        ax.text(i + (0.05 if errors else 0), v + 0.3, f"{v:.2f}", ha="left" if errors else "center", fontsize=8)
    ax.set_ylabel("test accuracy (%)")
    fig.tight_layout()
    return _save(fig, path)


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    _plt().close(fig)
    return path


# ---------------------------------------------------------------- report of a folder
# ``igkd report DIR`` renders report.md from sections. A section renderer takes the folder
# and returns Markdown (writing any PNGs it links into the folder), or None when the folder
# holds nothing for it. Renderers are named "module:function" so that importing this module
# imports none of them. To add a section, append to SECTIONS, e.g.
#     SECTIONS.append(("deployment", "igkd.deploy:deployment_section"))
SECTIONS: list[tuple[str, str]] = [
    ("run", "igkd.report:run_section"),
    ("deployment", "igkd.deploy:deployment_section"),  # latency, size, export parity, audit: next to accuracy
    ("ablation", "igkd.experiments.ablation:section"),
    ("montecarlo", "igkd.experiments.montecarlo:section"),
    ("compression", "igkd.experiments.compression:section"),
    ("search", "igkd.experiments.search:section"),
    ("gallery", "igkd.report:gallery_section"),
    ("curves", "igkd.report:curves_section"),
]
MAX_CURVES = 10


def _renderer(ref):
    if callable(ref):
        return ref
    import importlib
    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name)


def write_report(run_dir: str | Path, sections: list[tuple[str, object]] | None = None) -> str:
    """Render every section that has data in ``run_dir`` into ``run_dir/report.md``; return the text."""
    from .errors import UserError
    from .fileio import write_text
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"{run_dir} is not a folder; give an experiment folder (igkd experiment ... --out DIR) "
                        "or a run folder (igkd distill --out DIR)")
    parts = []
    for _, ref in sections or SECTIONS:
        text = _renderer(ref)(run_dir)
        if text:
            parts.append(text.rstrip() + "\n")
    if not parts:
        raise UserError(f"{run_dir} holds no experiment results (ablation.json, montecarlo.json, ...) and no run "
                        "(summary.json); run 'igkd experiment' or 'igkd distill' into it first")
    kinds = []
    if (run_dir / "experiment.json").exists():
        kinds = json.loads((run_dir / "experiment.json").read_text()).get("kinds", [])
    text = (f"# igkd report: {run_dir.name}\n\n" + (f"Experiments in this folder: {', '.join(kinds)}.\n\n" if kinds
                                                     else "") + "\n".join(parts))
    write_text(run_dir / "report.md", text)
    return text


def terminal_summary(markdown: str) -> str:
    """The headings and tables of a report, for the terminal."""
    out, previous = [], ""
    for line in markdown.splitlines():
        if line.startswith("#") or (line.startswith("|") and not previous.startswith("|")):
            if out and out[-1] != "":
                out.append("")
        if line.startswith(("#", "|")):
            out.append(line)
        previous = line
    return "\n".join(out).strip("\n")


def read_json(path: Path) -> dict | None:
    """A results file of a run folder, or None when it is not there."""
    return json.loads(path.read_text()) if path.exists() else None


def run_section(run_dir: Path) -> str | None:
    """A single training run folder (igkd train / distill): its summary."""
    s = read_json(run_dir / "summary.json")
    if s is None:
        return None
    rows = [[s.get("method", "train"), s["model"], s["params"], s["best_epoch"], s["val_accuracy"],
             s["test_accuracy"]]]
    comp = f" Compression {s['compression']:.2f}x against the teacher." if s.get("compression") else ""
    return (f"## Run\n\nDataset `{s['dataset']}`, {s['epochs']} epochs.{comp}\n\n"
            + markdown_table(["method", "model", "params", "best epoch", "val acc (%)", "test acc (%)"], rows) + "\n")


def gallery_section(run_dir: Path) -> str | None:
    """Images, the teacher's IG maps and the overlays, from the store an experiment used."""
    from .data import load_dataset
    from .store import open_store
    ctx = None
    for kind in ("ablation", "montecarlo", "compression", "search"):
        result = read_json(run_dir / f"{kind}.json")
        if result and result.get("store"):
            ctx = result
            break
    if ctx is None:
        return None
    if not (Path(ctx["store"]) / "manifest.json").exists():
        return f"## Teacher IG maps\n\nThe store {ctx['store']} is gone; re-run the experiment to rebuild it.\n"
    store = open_store(ctx["store"])
    dataset = load_dataset(ctx["data"])
    train = dataset.train
    pick = [int((train.labels == c).nonzero()[0]) for c in range(dataset.num_classes) if (train.labels == c).any()]
    pick = torch.tensor(pick[:10])
    ig = ctx.get("ig") or {}
    gallery(run_dir / "gallery.png", train.images[pick], torch.from_numpy(store.maps[pick.numpy()].astype("float32")),
            [dataset.classes[int(train.labels[i])] for i in pick],
            title=f"teacher IG maps ({ig.get('method')}, {ig.get('steps')} steps) and the overlays students see")
    d = ig.get("completeness_delta") or store.manifest.get("completeness_delta") or {}
    err = (f" Completeness error |sum IG - (F(x) - F(x'))| / |F(x) - F(x')|: median "
           f"{100 * d['median_relative']:.1f}%, 90th percentile {100 * d['p90_relative']:.1f}%." if d else "")
    return (f"## Teacher IG maps\n\nFirst training image of each class, its IG map (sum over channels of |IG|, "
            f"baseline `{ig.get('baseline')}`) and the overlay (p = 1).{err}\n\n![gallery](gallery.png)\n")


def _mean_history(histories: list[list[dict]]) -> list[dict]:
    n = min(len(h) for h in histories)
    return [{"epoch": histories[0][i]["epoch"],
             "val_accuracy": float(np.mean([h[i]["val_accuracy"] for h in histories])),
             "loss": float(np.mean([h[i]["loss"] for h in histories]))} for i in range(n)]


def curves_section(run_dir: Path) -> str | None:
    """Validation accuracy and training loss per epoch, averaged over the runs of each method."""
    groups: dict[str, list[list[dict]]] = {}
    if (run_dir / "metrics.jsonl").exists():
        summary = read_json(run_dir / "summary.json") or {}
        groups[summary.get("method", "run")] = [[json.loads(x) for x in (run_dir / "metrics.jsonl").read_text()
                                                  .split("\n") if x.strip()]]
    runs = sorted((run_dir / "runs").glob("*/run.json")) if (run_dir / "runs").is_dir() else []
    tagged = [(p.parent, read_json(p).get("tags", {})) for p in runs if (p.parent / "metrics.jsonl").exists()]
    plain = [(d, t) for d, t in tagged if "model" not in t and "T" not in t] or tagged
    for d, t in plain:
        name = t.get("method", d.name) + (f" {t['model']}" if "model" in t else "")
        hist = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines() if x.strip()]
        if hist:
            groups.setdefault(name, []).append(hist)
    if not groups:
        return None
    names = list(groups)[:MAX_CURVES]
    training_curves(run_dir / "curves.png", {n: _mean_history(groups[n]) for n in names})
    counts = ", ".join(f"{n} ({len(groups[n])})" for n in names)
    more = f" ({len(groups) - len(names)} more groups not drawn)" if len(groups) > len(names) else ""
    return (f"## Training curves\n\nMean over runs (count in brackets): {counts}{more}.\n\n![curves](curves.png)\n")
