"""The per-op / per-collective summary rows that the terminal, Markdown and HTML reports all show."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..records import STATUSES, CheckResult, SuiteResult


@dataclass
class SummaryRow:
    level: str
    op: str
    impl: str
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(STATUSES, 0))
    worst_ratio: float | None = None  # the largest error / allowed error among its checks (below 1 passes)

    @property
    def verdict(self) -> str:
        for status in ("error", "fail", "xpass", "xfail"):
            if self.counts[status]:
                return status
        return "pass" if self.counts["pass"] else "skip"


def summary_rows(result: SuiteResult) -> list[SummaryRow]:
    rows: dict[tuple[str, str], SummaryRow] = {}
    for c in result.checks:
        row = rows.setdefault((c.level, c.op), SummaryRow(c.level, c.op, c.impl if c.level == "ops" else ""))
        row.counts[c.status] += 1
        if c.err_ratio is not None and c.status in ("pass", "fail", "xfail", "xpass"):
            row.worst_ratio = max(row.worst_ratio or 0.0, c.err_ratio)
    return list(rows.values())


def failing_checks(result: SuiteResult) -> list[CheckResult]:
    """Failures first (they decide the exit code), then xfail/xpass so a reader sees the manifest at work."""
    order = {"error": 0, "fail": 1, "xpass": 2, "xfail": 3}
    return sorted((c for c in result.checks if c.status in order), key=lambda c: order[c.status])


def replay_commands(result: SuiteResult) -> list[str]:
    """One command per failing (op, dtype), in the order the failures appear."""
    seen: dict[str, None] = {}
    for c in result.failures():
        if c.replay:
            seen.setdefault(c.replay)
    return list(seen)


def fmt_err(x: float | None) -> str:
    return "-" if x is None else f"{x:.3g}"
