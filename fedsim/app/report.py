"""Score reconstructions against the truth and write a self-contained report.html and metrics.json.

Scoring is the only reader of `truth/`. The page embeds every image and plot (no network needed).
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

import torch

from fedsim.errors import FedsimError
from fedsim.files import atomic_write_json, atomic_write_text, load_tensors, read_jsonl
from fedsim.images import grid, png_bytes


def truth_for(run_dir: Path, result: dict) -> dict[str, torch.Tensor] | None:
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


def score_run(run_dir: str | Path) -> tuple[dict, list[dict], list[str]]:
    """Score every attack result of the run and write metrics.json: (summary per attack, rows, HTML cards)."""
    run_dir = Path(run_dir)
    if not (run_dir / "captures").is_dir():
        raise FedsimError(f"{run_dir} is not a run folder (no captures/ in it); give runs/<run-id>")
    rows, cards = [], []
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
        cards.append(_card(job_dir, result, row, truth))
    summary = summarise(rows)
    atomic_write_json(run_dir / "metrics.json", {"summary": summary, "reconstructions": rows})
    return summary, rows, cards


def write_report(run_dir: str | Path) -> Path:
    """Score every attack result of the run; write metrics.json and report.html into the run folder."""
    run_dir = Path(run_dir)
    summary, rows, cards = score_run(run_dir)
    page = run_dir / "report.html"
    body = run_section(run_dir, summary, cards, any(r.get("psnr_mean") is not None for r in rows))
    atomic_write_text(
        page, html_page(f"fedsim report: {run_dir.name}", "What the curious server reconstructed", "", [body])
    )
    return page


def final_accuracy(run_dir: Path) -> float | None:
    """The global model's test accuracy after the last round."""
    rows = [r for r in read_jsonl(run_dir / "training.jsonl") if "test-accuracy" in r]
    return max(rows, key=lambda r: r["round"])["test-accuracy"] if rows else None


# --- HTML ----------------------------------------------------------------------------------


def _img(data: bytes, mime: str, alt: str, css: str = "") -> str:
    return f'<img alt="{html.escape(alt)}" class="{css}" src="data:{mime};base64,{base64.b64encode(data).decode()}">'


def _curves(result: dict, row: dict) -> bytes | None:
    history = result.get("history") or []
    if not history:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    has_psnr = bool(row.get("psnr_curve"))
    fig, axes = plt.subplots(1, 2 if has_psnr else 1, figsize=(7 if has_psnr else 3.6, 2.6), squeeze=False)
    ax = axes[0][0]
    ax.semilogy([h["iteration"] for h in history], [max(h["loss"], 1e-30) for h in history])
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


def _card(job_dir: Path, result: dict, row: dict, truth: dict | None) -> str:
    title = f"{result['attack']} &middot; round {result['round']} &middot; client {result.get('partition_id')}"
    figures = []
    if truth is not None:
        true_images = truth["images"].float()
        true_images = true_images / 255.0 if truth["images"].dtype == torch.uint8 else true_images
        figures.append(
            f"<figure>{_img(png_bytes(grid(true_images)), 'image/png', 'private images')}"
            "<figcaption>private (client's truth)</figcaption></figure>"
        )
    if result["status"] != "ok":  # still show what the attack was after, and why it came back empty-handed
        reason = html.escape(str(result.get("reason")))
        return (
            f'<section class="card failed"><h3>{title}</h3><div class="row">{"".join(figures)}</div>'
            f"<p>reconstruction failed: {reason}</p></section>"
        )
    rec = load_tensors(job_dir / "reconstruction.safetensors")
    images = rec["images"]
    if "order" in row:  # show each reconstruction under the true image it was matched to
        images = images[torch.as_tensor(row["order"])]
    figures.append(
        f"<figure>{_img(png_bytes(grid(images)), 'image/png', 'reconstruction')}"
        "<figcaption>reconstruction</figcaption></figure>"
    )
    gif = job_dir / "animation.gif"
    if gif.exists():
        figures.append(
            f"<figure>{_img(gif.read_bytes(), 'image/gif', 'reconstruction emerging')}"
            "<figcaption>over the iterations</figcaption></figure>"
        )
    curves = _curves(result, row)
    plot = f"<figure class='plot'>{_img(curves, 'image/png', 'loss and PSNR curves')}</figure>" if curves else ""
    metrics = []
    if row.get("psnr_mean") is not None:
        metrics += [
            f"PSNR {row['psnr_mean']:.1f} dB",
            f"SSIM {row['ssim_mean']:.3f}",
            f"labels {row['label_accuracy']:.0%} right",
        ]
    metrics += [
        f"predicted labels {result.get('labels')}",
        f"{result.get('seconds', 0):.1f} s",
        f"objective: {row.get('objective')}",
    ]
    return (
        f'<section class="card"><h3>{title}</h3><div class="row">{"".join(figures)}</div>{plot}'
        f'<p class="metrics">{" &middot; ".join(html.escape(m) for m in metrics)}</p></section>'
    )


def run_section(run_dir: Path, summary: dict, cards: list[str], scored: bool, heading: str = "") -> str:
    """One run's part of a page: accuracy, the summary table per attack, a card per reconstruction."""
    rows = "".join(
        f"<tr><td>{html.escape(a)}</td><td>{s['reconstructions']}</td><td>{s['failed']}</td>"
        f"<td>{s.get('median_psnr_mean', float('nan')):.1f}</td><td>{s.get('median_ssim_mean', float('nan')):.3f}</td>"
        f"<td>{s.get('median_label_accuracy', float('nan')):.0%}</td><td>{s.get('median_seconds', 0):.1f}</td></tr>"
        for a, s in summary.items()
    )
    training = read_jsonl(run_dir / "training.jsonl")
    accuracy = ", ".join(f"round {r['round']}: {r['test-accuracy']:.1%}" for r in training if "test-accuracy" in r)
    note = (
        ""
        if scored
        else (
            "<p class='note'>No ground truth in this run (it is recorded only in simulation with "
            "<code>save-truth = true</code>), so reconstructions are shown without scores.</p>"
        )
    )
    title = f"<h2>{html.escape(heading)}</h2>" if heading else ""
    empty = "<p>No attack results yet: run <code>fedsim attack</code> on this run first.</p>"
    return f"""<section class="run">{title}
<p>Run <code>{html.escape(run_dir.name)}</code>. Global test accuracy: {html.escape(accuracy) or "n/a"}.</p>
{note}
<table><tr><th>attack</th><th>reconstructions</th><th>failed</th><th>median PSNR (dB)</th><th>median SSIM</th>
<th>median label accuracy</th><th>median seconds</th></tr>{rows}</table>
{"".join(cards) or empty}</section>"""


def html_page(title: str, heading: str, intro: str, sections: list[str]) -> str:
    """A self-contained page: inline style, images embedded, nothing fetched from the network."""
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2rem; background: #fafafa; color: #222; font-size: 1.1rem; }}
h1 {{ margin-bottom: 0.2rem; }} table {{ border-collapse: collapse; margin: 1rem 0; }}
td, th {{ border: 1px solid #ccc; padding: 0.3rem 0.7rem; text-align: right; }}
.card {{ background: white; border: 1px solid #ddd; border-radius: 8px; padding: 1rem; margin: 1rem 0; }}
.card.failed {{ border-color: #c33; }} .row {{ display: flex; flex-wrap: wrap; gap: 1.5rem; }}
figure {{ margin: 0; }} figcaption {{ font-size: 0.9rem; color: #555; text-align: center; }}
img {{ image-rendering: pixelated; max-width: 100%; }} .metrics {{ font-size: 1.05rem; }}
.note {{ background: #fff7d6; padding: 0.6rem; border-radius: 6px; }}
.explain {{ max-width: 60rem; line-height: 1.5; }} section.run {{ margin-top: 2rem; }}
</style></head><body>
<h1>{html.escape(heading)}</h1>
{intro}
{"".join(sections)}
</body></html>
"""
