"""A self-contained HTML report: verdict, per-op summary, op coverage, model curves (inline SVG), every check.

No external assets: styles are inline, plots are SVG drawn by `svg.line_chart`, so the file can be
attached to a bug report or served from anywhere.
"""

from __future__ import annotations

from html import escape

from ..records import SuiteResult
from .summary import fmt_err, replay_commands, summary_rows
from .svg import Series, line_chart

_CSS = """
body{font-family:sans-serif;margin:24px;color:#222}table{border-collapse:collapse;margin:8px 0 24px}
td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px;text-align:left}th{background:#f3f3f3}
.pass{background:#e7f6e7}.fail,.error{background:#fbe3e3}.xfail{background:#fff5d6}.xpass{background:#f3e3fb}
.skip{color:#888}code{font-size:12px}.verdict{font-size:20px;font-weight:bold}
"""


def _row(cells: list[object], cls: str = "") -> str:
    attr = f' class="{cls}"' if cls else ""
    return f"<tr{attr}>" + "".join(f"<td>{escape(str(c))}</td>" for c in cells) + "</tr>"


def _table(headers: list[str], rows: list[str]) -> str:
    return "<table><tr>" + "".join(f"<th>{escape(h)}</th>" for h in headers) + "</tr>" + "".join(rows) + "</table>"


def render_html(result: SuiteResult) -> str:
    counts = result.counts()
    verdict = "PASS" if result.ok else "FAIL"
    body = [f"<h1>Conformance report: {escape(result.backend)}</h1>",
            f'<p class="verdict {"pass" if result.ok else "fail"}">{verdict}: '
            + escape(", ".join(f"{counts[s]} {s}" for s in counts if counts[s])) + "</p>",
            "<p>" + escape(f"device {result.device_name}; levels {', '.join(result.levels)}; seed {result.seed}; "
                           f"quick {result.quick}; strict {result.strict}; started {result.started}; "
                           f"took {result.duration_s:.1f}s") + "<br>"
            + escape(", ".join(f"{k} {v}" for k, v in result.environment.items())) + "</p>"]
    body += [f"<p><b>note:</b> {escape(n)}</p>" for n in result.notes]
    body.append("<h2>Summary</h2>" + _table(
        ["level", "op", "impl", "pass", "fail", "error", "xfail", "xpass", "skip", "err / tol", "verdict"],
        [_row([r.level, r.op, r.impl, *(r.counts[s] for s in ("pass", "fail", "error", "xfail", "xpass", "skip")),
               fmt_err(r.worst_ratio), r.verdict], r.verdict) for r in summary_rows(result)]))
    native = sum(kind == "native" for kind in result.coverage.values())
    body.append(f"<h2>Op coverage: {native} native, {len(result.coverage) - native} fallback</h2>" + _table(
        ["op", "implementation"],
        [_row([op, kind], "pass" if kind == "native" else "xfail") for op, kind in sorted(result.coverage.items())]))
    for curve in result.curves:
        steps = curve["steps"]
        body.append(f"<h2>Model level, {escape(curve['dtype'])} ({escape(curve['model'])})</h2><p>"
                    + escape(f"bands (relative, per step): loss {curve['band']['loss']:g}, "
                             f"grad norm {curve['band']['grad_norm']:g}") + "</p>")
        for key, title in (("loss", "loss"), ("grad_norm", "gradient norm")):
            body.append(line_chart([Series(result.backend, steps, curve[key], "#d62728"),
                                    Series("cpu float64", steps, curve[f"{key}_ref"], "#1f77b4", dashed=True)],
                                   f"{title}, {curve['dtype']}"))
    commands = replay_commands(result)
    if commands:
        body.append("<h2>Replay a failure</h2><pre>" + escape("\n".join(commands)) + "</pre>")
    body.append("<h2>Every check</h2>" + _table(
        ["status", "level", "op", "check", "dtype", "sample", "shape", "impl", "max abs err", "max rel err", "rtol",
         "atol", "message"],
        [_row([c.status, c.level, c.op, c.check, c.dtype, c.sample, c.shape, c.impl, fmt_err(c.max_abs_err),
               fmt_err(c.max_rel_err), fmt_err(c.rtol), fmt_err(c.atol), c.message], c.status)
         for c in result.checks]))
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>conformance {escape(result.backend)}</title>"
            f"<style>{_CSS}</style></head><body>" + "\n".join(body) + "</body></html>\n")
