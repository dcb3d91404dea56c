"""Conformance results: one `CheckResult` per check, the `SuiteResult` of a run, and its JSON form.

The JSON layout (``SuiteResult.to_dict``) is the report format every other report is rendered from;
its schema is documented in ``docs/conformance/README.md`` and versioned by ``SCHEMA_VERSION``.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

SCHEMA_VERSION = 1

# pass: matched the reference. fail: computed something else. error: raised. xfail: failed or raised,
# and the backend's manifest said it would. xpass: passed although the manifest said it would fail.
# skip: not applicable (the reason is in ``message``).
STATUSES = ("pass", "fail", "error", "xfail", "xpass", "skip")


@dataclass(kw_only=True)
class CheckResult:
    level: str  # "ops" | "comm" | "model"
    op: str  # op name, collective name, or "model"
    check: str  # forward | backward | determinism | nan_inf | collective | logits | loss_curve | grad_norm_curve
    dtype: str = ""
    sample: str = ""  # the sample's label ("4x64", "8x128-strided:noncontig", "world2:torch")
    shape: str = ""
    status: str = "pass"
    max_abs_err: float | None = None
    max_rel_err: float | None = None
    rtol: float | None = None
    atol: float | None = None
    err_ratio: float | None = None  # worst error / allowed error (below 1 passes); the headroom at a glance
    message: str = ""
    impl: str = ""  # "native" | "fallback" for op checks
    seed: int | None = None
    replay: str = ""  # a command that reruns just this check's op and dtype
    duration_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(kw_only=True)
class SuiteResult:
    backend: str
    device_name: str
    levels: list[str]
    seed: int
    quick: bool
    strict: bool
    started: str  # ISO 8601, UTC
    duration_s: float = 0.0
    environment: dict[str, Any] = field(default_factory=dict)  # versions, platform, git commit, command
    coverage: dict[str, str] = field(default_factory=dict)  # op -> "native" | "fallback"
    checks: list[CheckResult] = field(default_factory=list)
    # model level: one entry per dtype, each {"dtype", "band", "steps", "loss", "loss_ref", "grad_norm",
    # "grad_norm_ref", "model"}
    curves: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        c = Counter(check.status for check in self.checks)
        return {s: c.get(s, 0) for s in STATUSES}

    def failures(self) -> list[CheckResult]:
        """The checks that make the run fail: fail and error always, xpass too in strict mode."""
        bad = {"fail", "error", "xpass"} if self.strict else {"fail", "error"}
        return [c for c in self.checks if c.status in bad]

    @property
    def ok(self) -> bool:
        """Every required check passed, and at least one check ran (a run that skipped everything proves nothing)."""
        return not self.failures() and any(c.status != "skip" for c in self.checks)

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION,
            "backend": self.backend,
            "device_name": self.device_name,
            "levels": self.levels,
            "seed": self.seed,
            "quick": self.quick,
            "strict": self.strict,
            "started": self.started,
            "duration_s": round(self.duration_s, 3),
            "ok": self.ok,
            "counts": self.counts(),
            "environment": self.environment,
            "coverage": self.coverage,
            "notes": self.notes,
            "curves": self.curves,
            "checks": [c.to_dict() for c in self.checks],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SuiteResult:
        if data.get("schema_version") != SCHEMA_VERSION:
            raise ValueError(f"report schema {data.get('schema_version')!r}, this reader knows {SCHEMA_VERSION}")
        fields = {k: data[k] for k in ("backend", "device_name", "levels", "seed", "quick", "strict", "started",
                                       "duration_s", "environment", "coverage", "curves", "notes")}
        return cls(**fields, checks=[CheckResult(**c) for c in data["checks"]])
