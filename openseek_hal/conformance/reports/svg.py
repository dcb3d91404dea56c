"""A small line chart as inline SVG (the HTML report's loss and grad-norm curves; no plotting dependency)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from html import escape


@dataclass(frozen=True)
class Series:
    label: str
    xs: list[float]
    ys: list[float]
    color: str
    dashed: bool = False


def _ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    if hi <= lo:
        return [lo]
    step = 10 ** math.floor(math.log10((hi - lo) / count))
    for mult in (1, 2, 5, 10):
        if (hi - lo) / (step * mult) <= count:
            step *= mult
            break
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]


def line_chart(series: list[Series], title: str, width: int = 480, height: int = 260) -> str:
    left, right, top, bottom = 64, 12, 28, 40
    finite = [(x, y) for s in series for x, y in zip(s.xs, s.ys) if math.isfinite(y)]
    if not finite:
        return f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="40"><text x="4" y="20">' \
               f'{escape(title)}: no finite values</text></svg>'
    x_lo, x_hi = min(x for x, _ in finite), max(x for x, _ in finite)
    y_lo, y_hi = min(y for _, y in finite), max(y for _, y in finite)
    pad = (y_hi - y_lo) * 0.05 or abs(y_hi) * 0.05 or 1.0
    y_lo, y_hi = y_lo - pad, y_hi + pad
    x_hi = x_hi if x_hi > x_lo else x_lo + 1

    def px(x: float) -> float:
        return left + (x - x_lo) / (x_hi - x_lo) * (width - left - right)

    def py(y: float) -> float:
        return top + (y_hi - y) / (y_hi - y_lo) * (height - top - bottom)

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="11">',
             f'<text x="{width / 2}" y="16" text-anchor="middle" font-size="13">{escape(title)}</text>',
             f'<rect x="{left}" y="{top}" width="{width - left - right}" height="{height - top - bottom}" '
             'fill="none" stroke="#999"/>']
    for y in _ticks(y_lo, y_hi):
        parts.append(f'<line x1="{left}" x2="{width - right}" y1="{py(y):.1f}" y2="{py(y):.1f}" stroke="#eee"/>'
                     f'<text x="{left - 4}" y="{py(y) + 4:.1f}" text-anchor="end">{y:.4g}</text>')
    for x in _ticks(x_lo, x_hi):
        parts.append(f'<text x="{px(x):.1f}" y="{height - bottom + 14}" text-anchor="middle">{x:g}</text>')
    parts.append(f'<text x="{(left + width - right) / 2}" y="{height - 6}" text-anchor="middle">step</text>')
    for i, s in enumerate(series):
        points = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in zip(s.xs, s.ys) if math.isfinite(y))
        dash = ' stroke-dasharray="5,4"' if s.dashed else ""
        parts.append(f'<polyline fill="none" stroke="{s.color}" stroke-width="2"{dash} points="{points}"/>')
        ly = top + 12 + 14 * i
        parts.append(f'<line x1="{width - right - 120}" x2="{width - right - 100}" y1="{ly}" y2="{ly}" '
                     f'stroke="{s.color}" stroke-width="2"{dash}/>'
                     f'<text x="{width - right - 96}" y="{ly + 4}">{escape(s.label)}</text>')
    parts.append("</svg>")
    return "".join(parts)
