"""The bench plot: a labelled scatter of weight memory against throughput,
written as a PNG with matplotlib when it is installed, else with Pillow (which
comes with vLLM), so it works on a fresh machine."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from vllm_mixed.errors import MixedError

__all__ = ["PLOT_SIZE", "write_plot"]

PLOT_SIZE = (800, 500)


def write_plot(
    points: Sequence[tuple[str, float, float]], path: str | Path, *, x_label: str = "weight memory",
    y_label: str = "output tok/s", title: str = "", backend: str = "auto",
) -> str:  # fmt: skip
    """Write a labelled scatter (label, x, y) of ``PLOT_SIZE`` pixels as PNG.
    matplotlib when importable (``backend='auto'``), else Pillow, so the plot
    works on a fresh machine; returns the backend used."""
    if backend not in ("auto", "matplotlib", "pillow"):
        raise MixedError(f"plot backend {backend!r}: use one of: auto, matplotlib, pillow")
    if not points:
        raise MixedError("nothing to plot: no rows were benchmarked")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if backend != "pillow":
        try:
            from matplotlib.backends.backend_agg import FigureCanvasAgg
            from matplotlib.figure import Figure
        except ImportError:
            if backend == "matplotlib":
                raise MixedError(
                    "matplotlib is not installed; `pip install matplotlib` or use the Pillow plot"
                ) from None
        else:
            fig = Figure(figsize=(PLOT_SIZE[0] / 100, PLOT_SIZE[1] / 100), dpi=100)
            FigureCanvasAgg(fig)
            ax = fig.add_subplot()
            for i, (label, x, y) in enumerate(points):
                ax.scatter([x], [y], s=60, color=f"C{i % 10}", zorder=3)
                ax.annotate(label, (x, y), xytext=(7, 7), textcoords="offset points")
            ax.set_xlim(0, _ticks(max(p[1] for p in points) * 1.15)[-1])
            ax.set_ylim(0, _ticks(max(p[2] for p in points) * 1.15)[-1])
            ax.set(xlabel=x_label, ylabel=y_label, title=title)
            ax.grid(True, alpha=0.3)
            fig.savefig(path, dpi=100, format="png")
            return "matplotlib"
    _plot_pillow(points, path, x_label, y_label, title)
    return "pillow"


_COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22"]


def _ticks(top: float) -> list[float]:
    """0 up to at least ``top`` in round steps (1, 2 or 5 times a power of ten)."""
    top = top if top > 0 else 1.0
    raw = top / 5
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw * (1 - 1e-9))
    return [i * step for i in range(math.ceil(top / step - 1e-9) + 1)]


def _plot_pillow(
    points: Sequence[tuple[str, float, float]], path: Path, x_label: str, y_label: str, title: str
) -> None:
    from PIL import Image, ImageDraw, ImageFont

    try:
        font = ImageFont.load_default(size=14)
    except TypeError:  # Pillow < 10.1: a fixed bitmap font
        font = ImageFont.load_default()
    width, height = PLOT_SIZE
    left, right, top, bottom = 80, width - 30, 50, height - 60
    img = Image.new("RGB", PLOT_SIZE, "white")
    draw = ImageDraw.Draw(img)
    xt = _ticks(max(p[1] for p in points) * 1.15)
    yt = _ticks(max(p[2] for p in points) * 1.15)
    px = lambda x: left + (right - left) * x / xt[-1]  # noqa: E731
    py = lambda y: bottom - (bottom - top) * y / yt[-1]  # noqa: E731
    for x in xt:
        draw.line([(px(x), top), (px(x), bottom)], fill="#e6e6e6")
        draw.text((px(x), bottom + 6), f"{x:g}", fill="black", font=font, anchor="ma")
    for y in yt:
        draw.line([(left, py(y)), (right, py(y))], fill="#e6e6e6")
        draw.text((left - 6, py(y)), f"{y:g}", fill="black", font=font, anchor="rm")
    draw.rectangle([left, top, right, bottom], outline="black")
    draw.text(((left + right) / 2, height - 22), x_label, fill="black", font=font, anchor="mm")
    draw.text((left, top - 8), y_label, fill="black", font=font, anchor="ld")
    draw.text((width / 2, 16), title, fill="black", font=font, anchor="mm")
    placed: list[tuple[float, float, float, float]] = []  # label boxes drawn so far: close points must not overlap
    order = sorted(range(len(points)), key=lambda i: -points[i][2])
    for i in order:
        label, x, y = points[i]
        cx, cy, r = px(x), py(y), 6
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=_COLORS[i % len(_COLORS)], outline="black")
        flip = cx + 10 + draw.textlength(label, font=font) > right
        anchor, tx, ty = ("rd" if flip else "ld"), (cx - 10 if flip else cx + 10), cy - 8
        box = draw.textbbox((tx, ty), label, font=font, anchor=anchor)
        while any(box[0] < b[2] and b[0] < box[2] and box[1] < b[3] and b[1] < box[3] for b in placed):
            ty += box[3] - box[1] + 4
            box = draw.textbbox((tx, ty), label, font=font, anchor=anchor)
        if ty != cy - 8:
            draw.line([(cx, cy), (tx, (box[1] + box[3]) / 2)], fill="#888888")
        draw.text(
            (tx, ty), label, fill=_COLORS[i % len(_COLORS)] if ty != cy - 8 else "black", font=font, anchor=anchor
        )
        placed.append(box)
    img.save(path, format="PNG")
