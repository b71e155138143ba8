"""What an evaluation shows a person: sample grids, training curves (PIL only; no plotting
library is a dependency) and report.md, all drawn from the figures report.json holds."""

from __future__ import annotations

import math
import textwrap

from PIL import Image, ImageDraw

from tessera.viz import BAD, BLACK, GOOD, GREY, WHITE, GridRow, grid_png, png_bytes

LINE = (40, 90, 200)


def sample_grid_png(rows: list[dict], *, scale: int = 4, title: str = "") -> bytes:
    """One row per caption: its text, then its candidates in the reranker's order (best first),
    each upscaled ×scale (nearest), labelled "#rank c<candidate> <score>" (c0 is the image without
    reranking) and, where a classifier scored them, framed green when it reads the caption in the
    image and red when not.

    rows: [{"caption": str, "images": [uint8 (S, S, 3)], "candidates": [int], "scores": [float | None],
    "correct": [bool] | None}], images in rank order."""
    grid = [GridRow(images=r["images"], caption=r["caption"],
                    tags=[f"#{k} c{c}" + (f" {s:.2f}" if s is not None else "")
                          for k, (c, s) in enumerate(zip(r["candidates"], r["scores"], strict=True))],
                    frames=None if r.get("correct") is None else [GOOD if ok else BAD for ok in r["correct"]])
            for r in rows]
    scored = any(r.get("correct") is not None for r in rows)
    subtitle = ("best first; " + ("green frame: the classifier reads the caption in it; " if scored else "")
                + "c0: no reranking")
    return grid_png(grid, scale=scale, title=title, min_width=420, subtitle=subtitle if title else "")


def _series(rows: list[dict]) -> dict[str, list[tuple[float, float]]]:
    """metric -> [(step, value)] of the finite numbers in history rows."""
    out: dict[str, list[tuple[float, float]]] = {}
    for row in rows:
        step = row.get("step")
        if not isinstance(step, (int, float)):
            continue
        for k, v in row.items():
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                out.setdefault(k, []).append((float(step), float(v)))
    return {k: sorted(v) for k, v in out.items()}


def _fmt(v: float) -> str:
    return f"{v:.3g}" if abs(v) < 1e4 else f"{v:.2e}"


def curves_png(stage: str, rows: list[dict], *, panel: tuple[int, int] = (300, 170),
               columns: int = 3) -> bytes | None:
    """A panel per numeric series of a stage's history rows ({"step": int, <metric>: float}),
    value against step on linear axes; series that never change are listed in one line instead.
    None when there is nothing to plot."""
    everything = _series(rows)
    series = {k: v for k, v in everything.items() if len({p[1] for p in v}) > 1}
    constant = [f"{k}={_fmt(v[0][1])}" for k, v in sorted(everything.items()) if k not in series]
    if not series:
        return None
    pw, ph = panel
    n = len(series)
    ncols = min(columns, n)
    nrows = -(-n // ncols)
    notes = (textwrap.wrap("constant: " + ", ".join(constant), max(20, ncols * pw // 6 - 4))
             if constant else [])
    canvas = Image.new("RGB", (ncols * pw, 20 + nrows * ph + 14 * len(notes) + 4), WHITE)
    draw = ImageDraw.Draw(canvas)
    draw.text((6, 4), f"{stage}: {len(rows)} reports", fill=BLACK)
    for k, note in enumerate(notes):
        draw.text((6, 20 + nrows * ph + 14 * k), note, fill=GREY)
    for i, (name, points) in enumerate(sorted(series.items())):
        ox, oy = (i % ncols) * pw, 20 + (i // ncols) * ph
        left, top, right, bottom = ox + 44, oy + 18, ox + pw - 10, oy + ph - 22
        steps, values = [p[0] for p in points], [p[1] for p in points]
        lo, hi = min(values), max(values)
        s0, s1 = steps[0], steps[-1] if steps[-1] > steps[0] else steps[0] + 1
        draw.text((ox + 6, oy + 3), f"{name} (last {_fmt(values[-1])})", fill=BLACK)
        draw.rectangle((left, top, right, bottom), outline=GREY)
        draw.text((ox + 2, top - 2), _fmt(hi), fill=GREY)
        draw.text((ox + 2, bottom - 10), _fmt(lo), fill=GREY)
        draw.text((left, bottom + 4), f"{s0:g}", fill=GREY)
        draw.text((right - 6 * len(f"{s1:g}"), bottom + 4), f"{s1:g}", fill=GREY)
        xy = [(left + (s - s0) / (s1 - s0) * (right - left), bottom - (v - lo) / (hi - lo) * (bottom - top))
              for s, v in points]
        if len(xy) == 1:
            draw.ellipse((xy[0][0] - 2, xy[0][1] - 2, xy[0][0] + 2, xy[0][1] + 2), fill=LINE)
        else:
            draw.line(xy, fill=LINE, width=2)
    return png_bytes(canvas)


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def _num(x: float | None, unit: str = "", digits: int = 3) -> str:
    return "–" if x is None else f"{x:.{digits}f}{unit}"


def markdown(report: dict) -> str:
    """report.md: the headline tables of report.json."""
    b, lines = report["bundle"], []
    lines += [f"# Evaluation of `{b['name']}`", "",
              f"Bundle `{b['uri']}` ({b['resolution']} px, "
              f"reranker: {'yes' if b['has_reranker'] else 'no'}); "
              f"{report['settings']['candidates']} candidates per caption, "
              f"temperature {report['settings']['temperature']}, "
              f"top-k {report['settings']['top_k']}, guidance {report['settings']['guidance_scale']}, "
              f"seed {report['settings']['seed']}.",
              f"Created {report['created']} in {report['wall_time_s']:.0f} s."]
    lines += _text_image(report)
    if report.get("classifier"):
        lines += _accuracy(report)
    d, p = report.get("dvae") or {}, report.get("prior") or {}
    lines += ["", "## Models", "", "| figure | value |", "|---|---:|"]
    if d.get("psnr_db") is not None:
        lines += [f"| dVAE reconstruction PSNR ({d['images']} val images) | {_num(d['psnr_db'], ' dB', 2)} |",
                  f"| dVAE reconstruction SSIM | {_num(d.get('ssim'))} |",
                  f"| dVAE codebook use (of K = {d['codebook_size']}) | {_pct(d['codebook_usage'])} |",
                  f"| dVAE codebook perplexity | {_num(d['perplexity'], '', 1)} |"]
    if p.get("val_image_loss") is not None:
        lines += [f"| prior val image loss, nats/token ({p.get('rows', '?')} rows, {p['source']}) | "
                  f"{_num(p['val_image_loss'])} |"]
        if p.get("val_image_loss_uncond") is not None:
            lines.append(f"| prior val image loss without captions | {_num(p['val_image_loss_uncond'])} |")
    for split, rows in (("val", p.get("rows")), ("heldout", p.get("heldout_rows"))):
        if p.get(f"{split}_image_bits_per_token") is not None:
            lines += [f"| prior {split} bits per image token, with captions ({rows} images) | "
                      f"{_num(p[f'{split}_image_bits_per_token'])} |",
                      f"| prior {split} bits per image token, without captions | "
                      f"{_num(p.get(f'{split}_image_bits_per_token_uncond'))} |"]
    for note in report.get("notes", []):
        lines.append(f"\n_{note}_")
    g = report.get("generation") or {}
    if g:
        lines += ["", f"Generated {g['images']} images in {g['seconds']:.0f} s ({g['images_per_s']:.1f}/s) "
                  f"on {report['settings']['num_actors']} actor(s)."]
    files = report.get("files", {})
    if files.get("grids"):
        lines += ["", "## Samples", ""] + [f"![{name}]({name})" for name in files["grids"]]
    if files.get("curves"):
        lines += ["", "## Training curves", ""] + [f"![{name}]({name})" for name in files["curves"]]
    missing = [s for s, v in (report.get("curves") or {}).items() if v.get("missing")]
    if missing:
        lines.append(f"\nNo history.json for: {', '.join(missing)} "
                     "(stage not run, or trained before curves were recorded).")
    return "\n".join(lines) + "\n"


def _text_image(report: dict) -> list[str]:
    """report.md's any-data section: R-precision and FID/KID per split, without and with reranking,
    and which scorer and features they come from (or why they were not computed)."""
    scorer, fid = report.get("scorer") or {}, report.get("fidelity") or {}
    table = ["| split | captions | reranking | R-precision | its chance | FID | KID |",
             "|---|---:|---|---:|---:|---:|---:|"]
    notes = []
    for split, s in report["splits"].items():
        r, f = s.get("r_precision") or {}, s.get("fidelity") or {}
        for mode, label in (("without_reranking", "no (candidate 0)"), ("with_reranking", "yes (best of M)")):
            m = f.get(mode) or {}
            kid = "–" if m.get("kid_mean") is None else f"{m['kid_mean']:.4f} ± {m['kid_std']:.4f}"
            table.append(f"| {split} | {s['captions']} | {label} | {_pct(r.get(mode))} | "
                         f"{_pct(r.get('chance'))} | {_num(m.get('fid'), '', 2)} | {kid} |")
        notes += [f"{split}: {x['status']}" for x in (r, f) if x.get("status")]
    done = {split: r["distractors"] for split, s in report["splits"].items()
            if "distractors" in (r := s.get("r_precision") or {})}
    fids = [s.get("fidelity") or {} for s in report["splits"].values()]
    computed = done or any("without_reranking" in f for f in fids)
    lines = ["", "## Text–image fit and fidelity"] + (["", *table] if computed else [])
    if done:
        lines += ["", "R-precision: the share of images whose own caption the scorer ranks above "
                  "the other distinct captions drawn from their split ("
                  + ", ".join(f"{k} for {split}" for split, k in done.items())
                  + f"); the scorer is `{scorer['uri']}` at step {scorer['step']}, a contrastive model "
                  "trained apart from the bundle's reranker (train_scorer), so reranking is not graded "
                  "by the model that reranked."]
    else:
        lines += ["", f"_{scorer.get('status', 'R-precision not computed')}_"]
    lines.append(f"FID/KID against {fid['real_images']} real val images: {fid['status']}."
                 if fid.get("real_images") else f"\n_{fid.get('status', 'FID not computed')}_")
    return lines + [f"\n_{n}_" for n in notes]


def _accuracy(report: dict) -> list[str]:
    """report.md's shapes sections: caption accuracy by the attribute classifier, and its ceiling."""
    lines = ["", "## Caption accuracy (attribute classifier)", "",
             "| split | captions | reranking | caption | colour | shape | size | layout | count | "
             "1 obj | 2 obj | 3 obj |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for split, s in report["splits"].items():
        for mode, label in (("without_reranking", "no (candidate 0)"), ("with_reranking", "yes (best of M)")):
            m = s.get(mode)
            if not m:
                continue
            by = [_pct(m["by_objects"].get(k, {}).get("caption_accuracy")) for k in ("1", "2", "3")]
            lines.append(f"| {split} | {m['n']} | {label} | **{_pct(m['caption_accuracy'])}** | "
                         f"{_pct(m['colour'])} | {_pct(m['shape'])} | {_pct(m['size'])} | "
                         f"{_pct(m['layout'])} | {_pct(m['count'])} | "
                         + " | ".join(by) + " |")
    lines += ["", "Any of the M candidates right (the most a reranker could reach): "
              + "; ".join(f"{split} {_pct(s.get('any_candidate'))}"
                          for split, s in report["splits"].items()) + "."]
    held = (report["splits"].get("heldout") or {}).get("novel_pairs")
    if held:
        lines.append(f"Held-out objects (novel colour/shape pairs, {held['n']} of them) "
                     f"drawn with both right: {_pct(held.get('colour_and_shape'))} (candidate 0), "
                     f"{_pct(held.get('colour_and_shape_reranked'))} (reranked).")
    c = report["classifier"]
    lines += ["", "## The classifier (its own ceiling)", "", "| images | caption accuracy |", "|---|---:|"]
    for key, label in (("real", "fresh renders at the bundle's resolution"),
                       ("real_2x", "fresh renders at 2x, area-downsampled"),
                       ("val_real", "prepared val images"),
                       ("val_reconstruction", "dVAE reconstructions of val images (ceiling)")):
        if c.get(key) is not None:
            lines.append(f"| {label} | {_pct(c[key])} |")
    lines.append(
        f"\n{'Trained in ' + format(c['train_seconds'], '.0f') + ' s' if c.get('trained_now') else 'Reused'} "
        f"from `{c['uri']}`.")
    mix = float((c.get("spec") or {}).get("recon_fraction") or 0)
    through = (f" and, in {mix:.0%} of its batches, on the same renders as this bundle's dVAE "
               "reconstructs them "
               "(so it also reads that decoder's colours and edges)") if mix else ""
    lines.append(f"Trained on renders of every colour/shape pair{through}.")
    return lines
