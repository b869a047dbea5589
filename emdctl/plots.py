"""PNG outputs people look at: sample grids, 2-D scatter plots, loss curves (Pillow only)."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

from .storage import atomic_path

PALETTE = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14), (23, 190, 207)]


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] floats -> uint8, EDM's convention (x * 127.5 + 128, clipped)."""
    if x.dtype == torch.uint8:
        return x
    return (x.float() * 127.5 + 128).clamp(0, 255).to(torch.uint8)


def _save(img: Image.Image, path: Path) -> None:
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")


def save_image_grid(x: torch.Tensor, path: Path, nrow: int | None = None, pad: int = 2) -> None:
    x = to_uint8(x.detach().cpu())
    n, c, h, w = x.shape
    nrow = nrow or max(1, int(math.ceil(math.sqrt(n))))
    rows = int(math.ceil(n / nrow))
    canvas = torch.zeros(c, rows * (h + pad) + pad, nrow * (w + pad) + pad, dtype=torch.uint8)
    for i in range(n):
        r, col = divmod(i, nrow)
        canvas[:, pad + r * (h + pad) : pad + r * (h + pad) + h, pad + col * (w + pad) : pad + col * (w + pad) + w] = x[
            i
        ]
    arr = canvas.permute(1, 2, 0).numpy()
    img = Image.fromarray(arr[:, :, 0] if c == 1 else arr, mode="L" if c == 1 else "RGB")
    _save(img, Path(path))


class _Axes:
    def __init__(self, draw, box, xlim, ylim):
        self.draw, self.box, self.xlim, self.ylim = draw, box, xlim, ylim

    def px(self, x, y):
        (x0, y0, x1, y1), (a, b), (c, d) = self.box, self.xlim, self.ylim
        return x0 + (x - a) / max(b - a, 1e-12) * (x1 - x0), y1 - (y - c) / max(d - c, 1e-12) * (y1 - y0)

    def frame(self, font, title=None, xlabel=None):
        x0, y0, x1, y1 = self.box
        self.draw.rectangle(self.box, outline=(0, 0, 0))
        for v, label in _labelled(_ticks(*self.xlim)):
            px, _ = self.px(v, self.ylim[0])
            self.draw.line([(px, y1), (px, y1 + 4)], fill=(0, 0, 0))
            self.draw.text((px - 12, y1 + 6), label, fill=(0, 0, 0), font=font)
        for v, label in _labelled(_ticks(*self.ylim)):
            _, py = self.px(self.xlim[0], v)
            self.draw.line([(x0 - 4, py), (x0, py)], fill=(0, 0, 0))
            self.draw.text((x0 - 56, py - 6), label, fill=(0, 0, 0), font=font)
        if title:
            self.draw.text((x0, y0 - 16), title, fill=(0, 0, 0), font=font)
        if xlabel:
            self.draw.text(((x0 + x1) / 2 - 20, y1 + 20), xlabel, fill=(0, 0, 0), font=font)


def _value_range(ys: list[float]) -> tuple[float, float]:
    """The y-range of a panel. A series that is constant up to float rounding (spread below 1e-9 of
    its size) is drawn as a flat line in the middle of a range around its value, not as a jump
    across a range of rounding noise."""
    lo, hi = min(ys), max(ys)
    scale = max(abs(lo), abs(hi), 1e-12)
    if hi - lo <= 1e-9 * scale:
        mid = (lo + hi) / 2
        pad = abs(mid) * 0.5 if mid != 0 else 1.0
        return mid - pad, mid + pad
    return lo, hi


def _ticks(lo, hi, n=5):
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        return [lo]
    step = 10 ** math.floor(math.log10((hi - lo) / n))
    for m in (1, 2, 5, 10):
        if (hi - lo) / (step * m) <= n:
            step *= m
            break
    start = math.ceil(lo / step) * step
    return [start + i * step for i in range(int((hi - start) / step) + 1)]


def _labelled(ticks: list[float]) -> list[tuple[float, str]]:
    """Tick labels, with more digits where the short form would repeat a label."""
    labels = [_fmt(v) for v in ticks]
    digits = 4
    while len(set(labels)) < len(labels) and digits < 16:
        labels = [f"{v:.{digits}g}" for v in ticks]
        digits += 1
    return list(zip(ticks, labels, strict=True))


def _fmt(v):
    if abs(v) >= 1e4:  # counts such as images seen: 500k, 1.5M
        for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
            if abs(v) >= div:
                return f"{v / div:.3g}{suffix}"
    if v != 0 and abs(v) < 1e-2:
        return f"{v:.0e}"
    return f"{v:g}"


def save_scatter(
    points: torch.Tensor,
    path: Path,
    reference: torch.Tensor | None = None,
    means=None,
    title: str | None = None,
    size: int = 560,
    radii=None,
    legend: tuple[str, str, str] | None = None,
) -> None:
    """2-D samples (blue) over reference samples (grey) and mode centres (red crosses), with a
    circle of radius radii[k] around mode k when given; `legend` names the three."""
    pts = points.detach().float().cpu()
    allpts = pts if reference is None else torch.cat([pts, reference.float()])
    finite = allpts[torch.isfinite(allpts).all(1)]
    lo = finite.quantile(0.001, dim=0) if len(finite) else torch.tensor([-1.0, -1.0])
    hi = finite.quantile(0.999, dim=0) if len(finite) else torch.tensor([1.0, 1.0])
    span = float((hi - lo).max()) * 1.1 + 1e-6
    mid = (lo + hi) / 2
    lim = [(float(mid[i]) - span / 2, float(mid[i]) + span / 2) for i in range(2)]
    legend_h = 14 * len(legend) + 8 if legend is not None else 0
    img = Image.new("RGB", (size + 70, size + 50 + legend_h), "white")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    ax = _Axes(draw, (64, 24, 64 + size - 20, 24 + size - 20), lim[0], lim[1])
    if reference is not None:
        for x, y in reference.float().tolist():
            px, py = ax.px(x, y)
            draw.point((px, py), fill=(170, 170, 170))
    for x, y in pts.tolist():
        if math.isfinite(x) and math.isfinite(y):
            px, py = ax.px(x, y)
            draw.ellipse([px - 1, py - 1, px + 1, py + 1], fill=PALETTE[0])
    for i, m in enumerate(means if means is not None else []):
        px, py = ax.px(float(m[0]), float(m[1]))
        draw.line([(px - 5, py - 5), (px + 5, py + 5)], fill=PALETTE[1], width=2)
        draw.line([(px - 5, py + 5), (px + 5, py - 5)], fill=PALETTE[1], width=2)
        if radii is not None:
            rx = abs(ax.px(float(m[0]) + radii[i], float(m[1]))[0] - px)
            draw.ellipse([px - rx, py - rx, px + rx, py + rx], outline=PALETTE[1], width=1)
    ax.frame(font, title)
    if legend is not None:  # below the axes, where it hides no sample
        x0, y0 = 64, size + 50
        for j, (label, colour) in enumerate(zip(legend, (PALETTE[0], (150, 150, 150), PALETTE[1]), strict=True)):
            draw.rectangle([x0, y0 + 14 * j + 2, x0 + 8, y0 + 14 * j + 10], fill=colour)
            draw.text((x0 + 14, y0 + 14 * j), label, fill=(0, 0, 0), font=font)
    _save(img, Path(path))


def save_curves(records: list[dict], keys: list[str], path: Path, x_key: str = "images", panel=(420, 260)) -> None:
    """One panel per metric key, values against images seen."""
    keys = [k for k in keys if any(k in r for r in records)]
    if not keys:
        return
    cols = min(3, len(keys))
    rows = int(math.ceil(len(keys) / cols))
    w, h = panel
    img = Image.new("RGB", (cols * w, rows * h), "white")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    for i, key in enumerate(keys):
        pts = [(r[x_key], r[key]) for r in records if key in r and isinstance(r[key], int | float)]
        pts = [(x, y) for x, y in pts if math.isfinite(y)]
        if not pts:
            continue
        r_, c_ = divmod(i, cols)
        ox, oy = c_ * w, r_ * h
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        ylo, yhi = _value_range(ys)
        ax = _Axes(
            draw,
            (ox + 60, oy + 24, ox + w - 16, oy + h - 40),
            (min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1),
            (ylo, yhi),
        )
        line = [ax.px(x, y) for x, y in pts]
        if len(line) > 1:
            draw.line(line, fill=PALETTE[i % len(PALETTE)], width=2)
        else:
            draw.ellipse([line[0][0] - 2, line[0][1] - 2, line[0][0] + 2, line[0][1] + 2], fill=PALETTE[0])
        ax.frame(font, key, x_key)
    _save(img, Path(path))


def save_paired(a: list[float], b: list[float], labels: list[str], path: Path, names=("a", "b"), title=None) -> None:
    """One point per seed, a's error across and b's up, over the diagonal: points below it are
    seeds where b has the lower error."""
    vals = [v for v in a + b if math.isfinite(v)]
    lo, hi = (min(vals), max(vals)) if vals else (0.0, 1.0)
    pad = (hi - lo) * 0.08 + 1e-9
    lim = (lo - pad, hi + pad)
    size = 480
    img = Image.new("RGB", (size + 80, size + 60), "white")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    ax = _Axes(draw, (64, 24, 64 + size - 20, 24 + size - 20), lim, lim)
    draw.line([ax.px(lim[0], lim[0]), ax.px(lim[1], lim[1])], fill=(170, 170, 170), width=1)
    for x, y, label in zip(a, b, labels, strict=True):
        if math.isfinite(x) and math.isfinite(y):
            px, py = ax.px(x, y)
            colour = PALETTE[2] if y < x else PALETTE[1]
            draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=colour)
            draw.text((px + 4, py - 12), label, fill=(90, 90, 90), font=font)
    ax.frame(font, title, f"{names[0]} (across) vs {names[1]} (up)")
    _save(img, Path(path))


def save_lines(
    x: list[float], series: dict[str, tuple[list[float], list[float]]], path: Path, title=None, xlabel="images"
) -> None:
    """Several series on one axes, each a mean with a +-1 standard error band drawn as thin lines
    (series: name -> (mean, standard error)); the legend follows the palette."""
    vals = [m + s * d for mean, se in series.values() for m, s in zip(mean, se, strict=True) for d in (-1, 1)]
    vals = [v for v in vals if math.isfinite(v)]
    lo, hi = (min(vals), max(vals)) if vals else (0.0, 1.0)
    pad = (hi - lo) * 0.05 + 1e-9
    w, h = 640, 400
    img = Image.new("RGB", (w, h), "white")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    xlim = (min(x), max(x) if max(x) > min(x) else min(x) + 1)
    ax = _Axes(draw, (70, 28, w - 20, h - 46), xlim, (lo - pad, hi + pad))
    for i, (name, (mean, se)) in enumerate(series.items()):
        colour = PALETTE[i % len(PALETTE)]
        for d, width in ((0, 2), (-1, 1), (1, 1)):
            pts = [ax.px(a, m + d * s) for a, m, s in zip(x, mean, se, strict=True) if math.isfinite(m + d * s)]
            if len(pts) > 1:
                draw.line(pts, fill=colour, width=width)
        draw.text((w - 200, 34 + 14 * i), f"-- {name}", fill=colour, font=font)
    ax.frame(font, title, xlabel)
    _save(img, Path(path))
