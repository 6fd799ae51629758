"""Score reconstructions against the truth and write a self-contained report.html and metrics.json.

Scoring is the only reader of `truth/`. The page embeds every image and plot (no network needed).
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import torch

from fedsim.app.pages import RunFacts, figure, finite, render, run_facts
from fedsim.errors import FedsimError
from fedsim.files import atomic_write_json, atomic_write_text, load_tensors, read_jsonl
from fedsim.images import enlarged_gif, grid, png_bytes
from fedsim.privacy import privacy_line


def truth_for(run_dir: Path, result: dict) -> dict[str, torch.Tensor] | None:
    if result.get("aggregate_of"):  # a secure aggregate: the batch of every client it sums, in that order
        parts = [truth_for(run_dir, {**result, "client": c, "aggregate_of": None}) for c in result["aggregate_of"]]
        if any(p is None for p in parts):
            return None
        return {k: torch.cat([p[k] for p in parts]) for k in ("images", "labels")}
    path = run_dir / "truth" / f"round-{result['round']:04d}" / f"client-{result['client']}.safetensors"
    return load_tensors(path) if path.exists() else None


def score_job(job_dir: Path, result: dict, truth: dict[str, torch.Tensor] | None) -> dict:
    """Metrics of one finished reconstruction (matched to the truth by optimal assignment), with curves."""
    from fedsim.scoring import score

    row = {k: result.get(k) for k in ("attack", "round", "client", "partition_id", "num_examples", "seconds", "loss")}
    row["objective"] = (result.get("info") or {}).get("objective")
    if truth is None:
        return row
    rec = load_tensors(job_dir / "reconstruction.safetensors")
    true_images = truth["images"].float()
    true_images = true_images / 255.0 if truth["images"].dtype == torch.uint8 else true_images
    scores = score(rec["images"], rec["labels"], true_images, truth["labels"])
    row.update(scores)
    snapshots_file = job_dir / "snapshots.safetensors"
    if snapshots_file.exists():
        snapshots = load_tensors(snapshots_file)
        row["psnr_curve"] = [
            [int(k[2:]), float(score(v, rec["labels"], true_images, truth["labels"])["psnr_mean"])]
            for k, v in sorted(snapshots.items())
        ]
    return row


def collect(run_dir: Path) -> list[tuple[Path, dict]]:
    results = []
    for path in sorted((run_dir / "attacks").glob("*/*/result.json")):
        results.append((path.parent, json.loads(path.read_text())))
    return results


def summarise(rows: list[dict]) -> dict[str, dict]:
    """Per attack: how many, and the median/mean of the scores across captures."""
    import statistics

    summary: dict[str, dict] = {}
    for attack in dict.fromkeys(r["attack"] for r in rows):
        mine = [r for r in rows if r["attack"] == attack]
        ok = [r for r in mine if r.get("status") == "ok"]
        entry = {"reconstructions": len(ok), "failed": len(mine) - len(ok)}
        for key in ("psnr_mean", "ssim_mean", "label_accuracy", "seconds"):
            values = [r[key] for r in ok if r.get(key) is not None]
            if values:
                entry[f"median_{key}"] = statistics.median(values)
        summary[attack] = entry
    return summary


def score_run(run_dir: str | Path) -> tuple[dict, list[dict], list[dict]]:
    """Score every attack result of the run and write metrics.json: (summary per attack, rows, page cards)."""
    run_dir = Path(run_dir)
    if not (run_dir / "captures").is_dir():
        raise FedsimError(f"{run_dir} is not a run folder (no captures/ in it); give runs/<run-id>")
    rows, cards = [], []
    facts = run_facts(run_dir)
    for job_dir, result in collect(run_dir):
        truth = truth_for(run_dir, result)
        if result["status"] == "ok":
            row = {"status": "ok", **score_job(job_dir, result, truth)}
        else:
            row = {
                "status": result["status"],
                "reason": result.get("reason"),
                **{k: result.get(k) for k in ("attack", "round", "client", "partition_id")},
            }
        rows.append(row)
        cards.append(_card(job_dir, result, row, truth, facts))
    summary = summarise(rows)
    atomic_write_json(run_dir / "metrics.json", {"summary": summary, "reconstructions": rows})
    return summary, rows, cards


def write_report(run_dir: str | Path) -> Path:
    """Score every attack result of the run; write metrics.json and report.html into the run folder."""
    run_dir = Path(run_dir)
    summary, rows, cards = score_run(run_dir)
    page = run_dir / "report.html"
    run = run_section(run_dir, summary, cards, any(r.get("psnr_mean") is not None for r in rows))
    text = render(
        "report.html.j2",
        title=f"fedsim report: {run_dir.name}",
        heading="What the curious server reconstructed",
        runs=[run],
    )
    atomic_write_text(page, text)
    return page


def final_accuracy(run_dir: Path) -> float | None:
    """The global model's test accuracy after the last round."""
    rows = [r for r in read_jsonl(run_dir / "training.jsonl") if "test-accuracy" in r]
    return max(rows, key=lambda r: r["round"])["test-accuracy"] if rows else None


# --- HTML ----------------------------------------------------------------------------------


def _curves(result: dict, row: dict) -> bytes | None:
    history = [h for h in result.get("history") or [] if isinstance(h, dict)]
    points = [(h.get("iteration"), finite(h.get("loss"))) for h in history]
    points = [(i, max(loss, 1e-30)) for i, loss in points if finite(i) is not None and loss is not None]
    if not points:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    has_psnr = bool(row.get("psnr_curve"))
    fig, axes = plt.subplots(1, 2 if has_psnr else 1, figsize=(7 if has_psnr else 3.6, 2.6), squeeze=False)
    ax = axes[0][0]
    ax.semilogy(*zip(*points, strict=True))
    ax.set(xlabel="iteration", ylabel="gradient distance", title="loss")
    if has_psnr:
        xs, ys = zip(*row["psnr_curve"], strict=True)
        axes[0][1].plot(xs, ys, marker=".")
        axes[0][1].set(xlabel="iteration", ylabel="PSNR (dB)", title="PSNR vs truth")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()


def _as_floats(images: torch.Tensor) -> torch.Tensor:
    return images.float() / 255.0 if images.dtype == torch.uint8 else images.float()


def _labels(result: dict, row: dict, truth: dict | None, facts: RunFacts) -> list[dict]:
    """Per image: the true label beside the recovered one (in the order of the true images), as class names."""
    recovered = result.get("labels")
    recovered = list(recovered) if isinstance(recovered, list) else []
    order = row.get("order")
    if isinstance(order, list) and all(isinstance(i, int) and 0 <= i < len(recovered) for i in order):
        recovered = [recovered[i] for i in order]
    true = [int(v) for v in truth["labels"].flatten().tolist()] if truth is not None else []
    pairs = []
    for i in range(max(len(true), len(recovered))):
        t = true[i] if i < len(true) else None
        r = recovered[i] if i < len(recovered) else None
        pairs.append(
            {
                "true": None if truth is None else ("" if t is None else facts.label(t)),
                "recovered": "" if r is None else facts.label(r),
                "right": None if t is None or r is None else t == r,
            }
        )
    return pairs


def _card(job_dir: Path, result: dict, row: dict, truth: dict | None, facts: RunFacts) -> dict:
    """What a card shows of one reconstruction: the private and recovered images, labels, metrics."""
    info = result.get("info") if isinstance(result.get("info"), dict) else {}
    card = {
        "attack": result.get("attack"),
        "round": result.get("round"),
        "partition_id": result.get("client") if result.get("partition_id") is None else result.get("partition_id"),
        "failed": result.get("status") != "ok",
        "reason": result.get("reason"),
        "figures": [],
        "labels": _labels(result, row, truth, facts),
        "plot": None,
        "psnr": finite(row.get("psnr_mean")),
        "ssim": finite(row.get("ssim_mean")),
        "label_accuracy": finite(row.get("label_accuracy")),
        "seconds": finite(result.get("seconds")),
        "objective": info.get("objective"),
    }
    if truth is not None:
        png = png_bytes(grid(_as_floats(truth["images"])))
        card["figures"].append(figure(png, "image/png", "private images", "private (client's truth)", picture=True))
    if card["failed"]:  # still show what the attack was after, and why it came back empty-handed
        return card
    images = load_tensors(job_dir / "reconstruction.safetensors")["images"]
    if "order" in row:  # show each reconstruction under the true image it was matched to
        images = images[torch.as_tensor(row["order"])]
    card["figures"].append(figure(png_bytes(grid(images)), "image/png", "reconstruction", "reconstruction", True))
    gif = job_dir / "animation.gif"
    if gif.exists():
        card["figures"].append(
            figure(enlarged_gif(gif.read_bytes()), "image/gif", "reconstruction emerging", "over the iterations", True)
        )
    curves = _curves(result, row)
    if curves:
        card["plot"] = figure(curves, "image/png", "loss and PSNR curves", plot=True)
    return card


def _card_order(card: dict) -> tuple:
    """Round, then partition id, then attack: ids that are not numbers (from a bad reply) sort after the rest."""

    def key(value) -> tuple:
        number = finite(value)
        return (0, number, "") if number is not None else (1, 0.0, str(value))

    return (key(card["round"]), key(card["partition_id"]), str(card["attack"]))


def run_section(
    run_dir: Path, summary: dict, cards: list[dict], scored: bool, heading: str = "", facts: RunFacts | None = None
) -> dict:
    """One run's part of a page: what ran, accuracy, the summary table per attack, a card per reconstruction."""
    facts = facts or run_facts(run_dir)
    training = read_jsonl(run_dir / "training.jsonl")
    accuracy = [
        {"round": r.get("round"), "value": finite(r["test-accuracy"])} for r in training if "test-accuracy" in r
    ]
    return {
        "heading": heading,
        "description": facts.description,
        "has_test_split": facts.has_test_split,
        "accuracy": accuracy,
        "privacy": privacy_line(run_dir),
        "scored": scored,
        "summary": summary,
        "cards": sorted(cards, key=_card_order),
    }
