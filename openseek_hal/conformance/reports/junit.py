"""JUnit XML for a vendor's CI: one testsuite per level, one testcase per check.

fail -> <failure>, error -> <error>, skip and xfail -> <skipped> (with the reason), xpass -> a passing
testcase with a system-out note, or a <failure> in strict mode.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET

from ..records import SuiteResult


def render_junit(result: SuiteResult) -> str:
    root = ET.Element("testsuites", name=f"openseek-hal conform {result.backend}")
    for level in result.levels:
        checks = [c for c in result.checks if c.level == level]
        suite = ET.SubElement(root, "testsuite", name=f"{result.backend}.{level}", tests=str(len(checks)),
                              failures=str(sum(c.status == "fail" or (result.strict and c.status == "xpass")
                                               for c in checks)),
                              errors=str(sum(c.status == "error" for c in checks)),
                              skipped=str(sum(c.status in ("skip", "xfail") for c in checks)),
                              time=f"{sum(c.duration_s for c in checks):.3f}", timestamp=result.started)
        props = ET.SubElement(suite, "properties")
        for key, value in {"seed": result.seed, "device": result.device_name, **result.environment}.items():
            ET.SubElement(props, "property", name=str(key), value=str(value))
        for c in checks:
            name = f"{c.check}[{c.dtype}:{c.sample}]" if c.dtype else f"{c.check}[{c.sample}]"
            case = ET.SubElement(suite, "testcase", classname=f"{result.backend}.{level}.{c.op}", name=name,
                                 time=f"{c.duration_s:.4f}")
            detail = f"{c.message}\nmax_abs_err={c.max_abs_err} max_rel_err={c.max_rel_err} " \
                     f"rtol={c.rtol} atol={c.atol}\nreplay: {c.replay}"
            if c.status == "fail" or (c.status == "xpass" and result.strict):
                ET.SubElement(case, "failure", message=c.message or c.status).text = detail
            elif c.status == "error":
                ET.SubElement(case, "error", message=c.message).text = detail
            elif c.status in ("skip", "xfail"):
                ET.SubElement(case, "skipped", message=f"{c.status}: {c.message}")
            elif c.status == "xpass":
                ET.SubElement(case, "system-out").text = f"xpass: {c.message}"
    ET.indent(root)
    return ET.tostring(root, encoding="unicode", xml_declaration=True) + "\n"
