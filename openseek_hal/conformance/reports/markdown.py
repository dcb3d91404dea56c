"""The Markdown report: summary, op coverage, model curves and failures, for a PR comment or a docs page."""

from __future__ import annotations

from ..records import SuiteResult
from .summary import failing_checks, fmt_err, replay_commands, summary_rows


def _cell(text: object) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def render_markdown(result: SuiteResult) -> str:
    counts = result.counts()
    lines = [
        f"# Conformance report: `{result.backend}`",
        "",
        f"- verdict: **{'PASS' if result.ok else 'FAIL'}** ("
        + ", ".join(f"{counts[s]} {s}" for s in counts if counts[s]) + ")",
        f"- device: {result.device_name}",
        f"- levels: {', '.join(result.levels)}; seed {result.seed}; quick {result.quick}; strict {result.strict}",
        f"- started {result.started}, took {result.duration_s:.1f}s",
        "- environment: " + ", ".join(f"{k} {v}" for k, v in result.environment.items()),
        *(f"- note: {n}" for n in result.notes),
        "",
        "## Summary",
        "",
        "| level | op | impl | pass | fail | error | xfail | xpass | skip | err / tol | verdict |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in summary_rows(result):
        c = row.counts
        lines.append(f"| {row.level} | {row.op} | {row.impl} | {c['pass']} | {c['fail']} | {c['error']} | "
                     f"{c['xfail']} | {c['xpass']} | {c['skip']} | {fmt_err(row.worst_ratio)} | {row.verdict} |")
    lines += ["", "## Op coverage", "", "| op | implementation |", "|---|---|"]
    lines += [f"| {op} | {kind} |" for op, kind in sorted(result.coverage.items())]
    for curve in result.curves:
        lines += ["", f"## Model level, {curve['dtype']} ({curve['model']})", "",
                  f"Bands: loss {curve['band']['loss']:g}, grad norm {curve['band']['grad_norm']:g} (relative).", "",
                  "| step | loss | reference | grad norm | reference |", "|---:|---:|---:|---:|---:|"]
        lines += [f"| {s} | {curve['loss'][s]:.6g} | {curve['loss_ref'][s]:.6g} | {curve['grad_norm'][s]:.6g} | "
                  f"{curve['grad_norm_ref'][s]:.6g} |" for s in curve["steps"]]
    shown = failing_checks(result)
    if shown:
        lines += ["", "## Checks that did not simply pass", "",
                  "| status | level | op | check | dtype | sample | shape | max abs err | max rel err | message |",
                  "|---|---|---|---|---|---|---|---:|---:|---|"]
        lines += [f"| {c.status} | {c.level} | {c.op} | {c.check} | {c.dtype} | {_cell(c.sample)} | {_cell(c.shape)} | "
                  f"{fmt_err(c.max_abs_err)} | {fmt_err(c.max_rel_err)} | {_cell(c.message)} |" for c in shown]
    commands = replay_commands(result)
    if commands:
        lines += ["", "## Replay", "", "```sh", *commands, "```"]
    return "\n".join(lines) + "\n"
