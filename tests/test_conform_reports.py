"""Reports (JSON schema, HTML, Markdown, JUnit), the `conform` command's exit codes, the comm-level plumbing."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET

import pytest
import torch
from click.testing import CliRunner

from openseek_hal.backend import ExpectedFailure, register_backend, unregister_backend
from openseek_hal.backends.cpu import CPUBackend
from openseek_hal.cli import cli, main
from openseek_hal.conformance import SuiteConfig, SuiteResult, comm_level, run_suite
from openseek_hal.conformance.reports import render_json, write_reports
from openseek_hal.errors import UserError
from openseek_hal.ops import norm


class _Faulty(CPUBackend):
    name = "conform-test-report"
    expected_failures = (ExpectedFailure("all_reduce", "known bf16 rounding on this link", torch.bfloat16),)

    def native_ops(self):
        return {**super().native_ops(), "rms_norm": lambda x, w, eps=1e-6: norm.rms_norm(x, w, eps * 10)}


def _fake_collectives(backend, adaptors, world_sizes, *, quick=False):
    """Stands in for conformance.collectives.run_collective_checks (same row format)."""
    rows = []
    for adaptor in adaptors:
        for world in world_sizes:
            for dtype, status in (("float32", "pass"), ("bfloat16", "fail"), ("int64", "pass")):
                rows.append(dict(level="comm", name=f"all_reduce/sum/{dtype}", op="all_reduce", adaptor=adaptor,
                                 world_size=world, dtype=dtype, shape=[0, 3] if dtype == "int64" else [5],
                                 status=status, max_abs_err=0.5 if status == "fail" else 0.0,
                                 message="" if status == "pass" else "rank 1 differs"))
    return rows


@pytest.fixture(scope="module")
def faulty_result() -> SuiteResult:
    register_backend(_Faulty)
    try:
        yield run_suite(SuiteConfig(backend=_Faulty.name, ops=["rms_norm", "silu_and_mul"], seed=7, quick=True,
                                    model_steps=2, adaptors=["fake"], world_sizes=[2],
                                    collective_checks=_fake_collectives))
    finally:
        unregister_backend(_Faulty.name)


def test_comm_rows_become_checks_and_the_manifest_applies(faulty_result):
    comm = [c for c in faulty_result.checks if c.level == "comm"]
    assert len(comm) == 3 and {c.op for c in comm} == {"all_reduce"}
    assert {c.dtype: c.status for c in comm} == {"float32": "pass", "bfloat16": "xfail", "int64": "pass"}
    xfail = next(c for c in comm if c.status == "xfail")
    assert "known bf16 rounding" in xfail.message and "--adaptor fake --world-size 2" in xfail.replay
    assert next(c for c in comm if c.dtype == "int64").shape == "0x3"


def test_comm_level_unavailable(monkeypatch):
    def missing():
        raise comm_level.CommUnavailable("the collective checks are not available (test)")

    monkeypatch.setattr(comm_level, "load_collective_checks", missing)
    implicit = run_suite(SuiteConfig(backend="cpu", levels=("comm",), seed=0))
    assert [c.status for c in implicit.checks] == ["skip"] and "not available" in implicit.notes[0]
    assert not implicit.ok  # a run that checked nothing is not a pass
    with pytest.raises(UserError, match="--level comm"):
        run_suite(SuiteConfig(backend="cpu", levels=("comm",), levels_explicit=True, seed=0))


def test_json_report_schema_round_trips(faulty_result, tmp_path):
    paths = write_reports(faulty_result, tmp_path)
    assert sorted(p.name for p in paths) == [f"conform-{_Faulty.name}.{ext}" for ext in ("html", "json", "md", "xml")]
    data = json.loads((tmp_path / f"conform-{_Faulty.name}.json").read_text())
    assert data["schema_version"] == 1 and data["ok"] is False and data["seed"] == 7
    assert data["counts"]["fail"] == sum(c["status"] == "fail" for c in data["checks"]) > 0
    assert data["coverage"]["rms_norm"] == "native" and data["environment"]["torch"] == torch.__version__
    check = next(c for c in data["checks"] if c["status"] == "fail")
    assert {"level", "op", "check", "dtype", "sample", "shape", "status", "max_abs_err", "max_rel_err", "rtol",
            "atol", "err_ratio", "message", "impl", "seed", "replay", "duration_s"} <= set(check)
    assert check["op"] == "rms_norm" and check["err_ratio"] > 1
    curve = data["curves"][0]
    assert curve["dtype"] == "float32" and len(curve["loss"]) == len(curve["loss_ref"]) == 2
    again = SuiteResult.from_dict(data)
    assert render_json(again) == render_json(faulty_result)


def test_html_markdown_and_junit(faulty_result):
    from openseek_hal.conformance.reports import render_html, render_junit, render_markdown

    html = render_html(faulty_result)
    assert html.count("<svg") == 2 and "http" not in html.replace("http://www.w3.org", "")  # self-contained
    for svg in html.split("<svg")[1:]:
        chart = ET.fromstring("<svg" + svg.split("</svg>")[0] + "</svg>")  # well-formed
        lines = chart.findall("{http://www.w3.org/2000/svg}polyline")
        assert len(lines) == 2 and all(len(line.get("points").split()) == 2 for line in lines)  # 2 steps each
    assert "Op coverage" in html and "rms_norm" in html and "FAIL" in html
    md = render_markdown(faulty_result)
    assert "**FAIL**" in md and "| ops | rms_norm | native |" in md and "```sh" in md
    assert "openseek-hal conform --backend conform-test-report --level ops --op rms_norm" in md
    root = ET.fromstring(render_junit(faulty_result))
    suites = {s.get("name"): s for s in root.iter("testsuite")}
    ops_suite = suites[f"{_Faulty.name}.ops"]
    assert int(ops_suite.get("failures")) == sum(c.status == "fail" for c in faulty_result.checks if c.level == "ops")
    assert int(suites[f"{_Faulty.name}.comm"].get("skipped")) == 1  # the declared xfail
    failure = next(case for case in ops_suite.iter("testcase") if case.find("failure") is not None)
    assert failure.get("classname") == f"{_Faulty.name}.ops.rms_norm" and "replay:" in failure.find("failure").text


def test_conform_exit_codes(tmp_path):
    runner = CliRunner()
    ok = runner.invoke(cli, ["conform", "--backend", "cpu", "--level", "ops", "--op", "silu_and_mul", "--quick",
                             "--seed", "3", "--report", str(tmp_path)])
    assert ok.exit_code == 0, ok.output
    assert "PASS" in ok.output and (tmp_path / "conform-cpu.html").exists()
    register_backend(_Faulty)
    try:
        bad = runner.invoke(cli, ["conform", "-b", _Faulty.name, "--level", "ops", "--op", "rms_norm", "--dtype",
                                  "fp64", "--seed", "3"])
    finally:
        unregister_backend(_Faulty.name)
    assert bad.exit_code == 1 and "FAIL" in bad.output
    assert f"openseek-hal conform --backend {_Faulty.name} --level ops --op rms_norm --dtype float64" in bad.output


@pytest.mark.parametrize("argv, message", [
    (["--op", "no_such_op"], "unknown op(s): no_such_op"),
    (["--level", "ops,gpu"], "unknown level(s): gpu"),
    (["--dtype", "fp7"], "unknown dtype(s): fp7"),
    (["--backend", "no-such-chip"], "unknown backend 'no-such-chip'"),
])
def test_conform_user_errors_are_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["conform", *argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_a_narrow_terminal_lists_each_failure_on_one_line(faulty_result):
    import io

    from rich.console import Console

    from openseek_hal.conformance.reports import print_report
    from openseek_hal.conformance.reports.summary import failing_checks

    out = io.StringIO()
    print_report(faulty_result, Console(file=out, width=80, color_system=None))
    text = out.getvalue()
    shown = failing_checks(faulty_result)
    assert shown and "checks that did not simply pass:" in text
    for c in shown[:40]:
        line = next(line for line in text.splitlines() if line.startswith(f"{c.status} {c.op} {c.check} {c.dtype} "))
        assert c.sample in line and c.message[:30] in line  # the whole check on its one (soft-wrapped) line
