"""Each op's typed schema (from its reference) agrees with its documented signature and the vendor guide."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from openseek_hal import ops
from openseek_hal.ops.opdef import ArgSchema


def _top_level_split(text: str) -> list[str]:
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += ch in "[(" and 1 or ch in "])" and -1 or 0
        if ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p.strip() for p in parts if p.strip()]


def _top_level_split_end(text: str) -> str:
    """``text`` up to the parenthesis that closes the one opened just before it."""
    depth = 0
    for i, ch in enumerate(text):
        depth += ch in "[(" and 1 or ch in "])" and -1 or 0
        if depth < 0:
            return text[:i]
    return text


def _documented(signature: str) -> list[tuple[str, str | None, bool]]:
    """(name, default text or None, keyword-only) of the arguments in an OpDef's signature string."""
    start = signature.index("(") + 1
    arguments = signature[start:start + len(_top_level_split_end(signature[start:]))]
    out, kw_only = [], False
    for piece in _top_level_split(arguments):
        if piece == "*":
            kw_only = True
            continue
        name = re.match(r"[A-Za-z_]\w*", piece).group()
        default = piece.split("=", 1)[1].strip() if "=" in piece else None
        out.append((name, default, kw_only))
    return out


@pytest.mark.parametrize("name", sorted(ops.REGISTRY))
def test_documented_signature_matches_the_schema(name):
    opdef = ops.get(name)
    schema = opdef.schema()
    documented = _documented(opdef.signature)
    assert [d[0] for d in documented] == [a.name for a in schema], opdef.signature
    for (arg_name, default, kw_only), arg in zip(documented, schema, strict=True):
        assert kw_only == arg.keyword_only, f"{name}.{arg_name}: keyword-only differs"
        if arg.required:
            assert default is None, f"{name}.{arg_name}: documented default {default} but the argument is required"
        else:
            assert default is not None and ast.literal_eval(default) == arg.default, \
                f"{name}.{arg_name}: documented default {default}, the reference's {arg.default!r}"


def test_schema_types_are_the_contract_kinds():
    kinds = {"Tensor", "Tensor | None", "Tensor[]", "Tensor[] | None", "int", "float", "bool", "str",
             "float | None", "Tensor | float | None",
             "float | Tensor", "int | Tensor"}  # adamw's lr and step: numbers, or device tensors in a captured step
    for name in ops.REGISTRY:
        for arg in ops.get(name).schema():
            assert isinstance(arg, ArgSchema) and arg.type in kinds, f"{name}.{arg.name}: {arg.type}"


def test_vendor_guide_lists_every_schema():
    guide = (Path(__file__).resolve().parents[1] / "docs" / "VENDOR_GUIDE.md").read_text()
    missing = [ops.get(n).schema_text() for n in ops.REGISTRY if ops.get(n).schema_text() not in guide]
    assert not missing, "docs/VENDOR_GUIDE.md lacks:\n" + "\n".join(missing)


def test_backends_ops_prints_the_schemas():
    from click.testing import CliRunner

    from openseek_hal.cli import cli

    result = CliRunner().invoke(cli, ["backends", "--ops"])
    assert result.exit_code == 0, result.output
    assert "moe_route(logits: Tensor, bias: Tensor | None = None, *, top_k: int" in result.output.replace("\n", "")
