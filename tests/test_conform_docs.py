"""The documented tolerance table is the one the code uses."""

from __future__ import annotations

from pathlib import Path

from openseek_hal.conformance.manifest import dtype_name
from openseek_hal.conformance.model_level import BANDS, LOGITS_BAND
from openseek_hal.ops.opdef import ATOL_PER_ELEMENT, RTOL

DOC = Path(__file__).resolve().parent.parent / "docs" / "conformance" / "tolerances.md"


def test_tolerance_doc_matches_the_code():
    text = DOC.read_text()
    for dtype, rtol in RTOL.items():
        assert f"| {dtype_name(dtype)} | {rtol:g} | {ATOL_PER_ELEMENT[dtype]:g} |" in text, dtype
    for dtype, (loss, grad_norm) in BANDS.items():
        assert f"| {dtype_name(dtype)} | {loss:g} | {grad_norm:g} | {LOGITS_BAND[dtype]:g} |" in text, dtype
