"""Launch parameters of the memory-bound kernels (`openseek_hal.ops.kernels.launch`), and warning-free kernels.

* Every config a sweep may pick (`launch.candidates`: the rule's, the previous launch, the
  alternatives) must compute the same op: each is run under the Triton interpreter at small shapes
  that exercise partial row and column blocks and the backward's strided row loop, forward and
  backward, against the float64 reference.
* The table and rule give every parameter of their kernel.
* No kernel may warn when Triton compiles it (Triton's code generator warns on ``and``/``or``
  between tensors; the interpreter does not run it): every kernel that the op samples launch is
  compiled for sm_90 with the launch's own argument types and constexprs, warnings recorded.
"""

from __future__ import annotations

import warnings

import pytest
import torch

pytest.importorskip("triton")

from openseek_hal.ops import get  # noqa: E402
from openseek_hal.ops.kernel_loader import load_kernels  # noqa: E402
from openseek_hal.ops.moe import _route_outputs, _route_scores  # noqa: E402

PKG = load_kernels(interpret=True)
launch = PKG.launch
SIZES = (64, 256, 1280, 2048, 2560, 4096, 7168)  # the model's row lengths (hidden, ffn, experts)
KERNEL_SIZES = {"rms_norm": (1280, 4096, 7168), "add_rms_norm": (1280, 4096, 7168), "silu_and_mul": (2048, 2560, 4096),
                "moe_route": (64, 256), "rope": (64,)}
PARAMS = {"rms_norm_fwd": {"ROWS", "num_warps"}, "add_rms_norm_fwd": {"ROWS", "num_warps"},
          "rms_norm_bwd": {"ROWS", "num_warps", "per_sm", "num_stages"},
          "add_rms_norm_bwd": {"ROWS", "num_warps", "per_sm", "num_stages"},
          "silu_and_mul_fwd": {"BLOCK", "ROWS", "num_warps"}, "silu_and_mul_bwd": {"BLOCK", "ROWS", "num_warps"},
          "moe_route_bwd": {"ROWS", "num_warps"}, "rope": {"ROWS", "num_warps"}}
OPTIONAL = {"rope": {"HEADS"}}  # parameters with a kernel-side default


def _all_candidates(kernel: str) -> list[dict[str, int]]:
    out: list[dict[str, int]] = []
    for n in KERNEL_SIZES[kernel.rsplit("_", 1)[0]]:
        for cfg in launch.candidates(kernel, n):
            if cfg not in out:
                out.append(cfg)
    return out


CASES = [(k, c) for k in launch.KERNELS for c in _all_candidates(k)]


def _close(actual: torch.Tensor, expected: torch.Tensor, op: str, n: int, what: str) -> None:
    rtol, atol = get(op).tol(torch.float32, n)
    torch.testing.assert_close(actual.double(), expected, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


def _check_norm(residual: bool, rows: int = 37, n: int = 80) -> None:
    g = torch.Generator().manual_seed(0)
    x, r = torch.randn(rows, n, generator=g), torch.randn(rows, n, generator=g)
    w = torch.randn(n, generator=g) * 0.1 + 1
    args = (x, r, w) if residual else (x, w)
    op = "add_rms_norm" if residual else "rms_norm"
    ours_args = [a.clone().requires_grad_() for a in args]
    ref_args = [a.double().requires_grad_() for a in args]
    out = getattr(PKG.norm, op)(*ours_args)
    ref = get(op).reference(*ref_args)
    out, ref = (out, ref) if residual else ((out,), (ref,))
    cots = [torch.randn(o.shape, generator=g) for o in out]
    for o, e in zip(out, ref):
        _close(o.detach(), e.detach(), op, n, f"{op} output")
    grads = torch.autograd.grad(out, ours_args, cots)
    ref_grads = torch.autograd.grad(ref, ref_args, [c.double() for c in cots])
    for i, (a, e) in enumerate(zip(grads, ref_grads)):
        _close(a, e, op, n * rows if i == len(args) - 1 else n, f"{op} grad {i}")


def _check_silu(rows: int = 9, d: int = 600) -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(rows, 2 * d, generator=g) * 2
    ours, ref = x.clone().requires_grad_(), x.double().requires_grad_()
    out, expected = PKG.activation.silu_and_mul(ours), get("silu_and_mul").reference(ref)
    _close(out.detach(), expected.detach(), "silu_and_mul", d, "silu_and_mul output")
    cot = torch.randn(out.shape, generator=g)
    (grad,), (ref_grad,) = torch.autograd.grad(out, ours, cot), torch.autograd.grad(expected, ref, cot.double())
    _close(grad, ref_grad, "silu_and_mul", d, "silu_and_mul grad")


def _check_route_backward(tokens: int = 11) -> None:
    """The backward alone, on given indices (the forward's choice is not what the config changes)."""
    g = torch.Generator().manual_seed(2)
    for experts, top_k, score_func, norm, scale in ((64, 6, "sigmoid", True, 2.5), (48, 4, "softmax", True, 1.0),
                                                     (32, 1, "softmax", False, 1.5), (200, 8, "sigmoid", True, 2.5)):
        logits = torch.randn(tokens, experts, generator=g)
        indices = torch.rand(tokens, experts, generator=g).argsort(dim=-1)[:, :top_k].contiguous()
        d_weights = torch.randn(tokens, top_k, generator=g)
        ours = PKG.moe._moe_route_backward_op(logits, indices, d_weights, 1, score_func, norm, scale)
        ref_logits = logits.double().requires_grad_()
        scores, _ = _route_scores(ref_logits, None, score_func)
        weights = _route_outputs(scores, indices, top_k, norm, scale)[1]
        (expected,) = torch.autograd.grad(weights, ref_logits, d_weights.double())
        _close(ours, expected, "moe_route", experts, f"moe_route grad E{experts} k{top_k} {score_func}")


def _check_rope() -> None:
    """Both layouts, a transposed (batch, seq, heads, dim) input as the model hands it: 3 heads x 37
    positions leave every candidate a partial last block of heads and of positions (head dims 64 and 24,
    whose halves are padded to 16 lanes); and one position of 5 heads (a program's positions capped at the
    sequence); forward and backward."""
    g = torch.Generator().manual_seed(3)
    for dim, interleaved, batch, heads, seq in ((64, False, 2, 3, 37), (64, True, 2, 3, 37), (24, False, 2, 3, 37),
                                                (24, True, 2, 3, 37), (64, False, 2, 5, 1), (24, True, 2, 5, 1)):
        cos, sin = torch.randn(seq, dim // 2, generator=g), torch.randn(seq, dim // 2, generator=g)
        x = torch.randn(batch, seq, heads, dim, generator=g).transpose(1, 2)
        ours, ref = x.clone().requires_grad_(), x.double().requires_grad_()
        out = PKG.rope.rope(ours, cos, sin, interleaved=interleaved)
        expected = get("rope").reference(ref, cos.double(), sin.double(), interleaved=interleaved)
        _close(out.detach(), expected.detach(), "rope", dim, f"rope output interleaved={interleaved}")
        cot = torch.randn(out.shape, generator=g)
        (grad,), (ref_grad,) = torch.autograd.grad(out, ours, cot), torch.autograd.grad(expected, ref, cot.double())
        _close(grad, ref_grad, "rope", dim, f"rope grad interleaved={interleaved}")


CHECKS = {"rms_norm_fwd": lambda: _check_norm(False), "rms_norm_bwd": lambda: _check_norm(False),
          "add_rms_norm_fwd": lambda: _check_norm(True), "add_rms_norm_bwd": lambda: _check_norm(True),
          "silu_and_mul_fwd": _check_silu, "silu_and_mul_bwd": _check_silu, "moe_route_bwd": _check_route_backward,
          "rope": _check_rope}


@pytest.mark.parametrize("kernel,cfg", CASES, ids=[f"{k}-{'-'.join(f'{a}{v}' for a, v in c.items())}"
                                                  for k, c in CASES])
def test_every_candidate_config_matches_the_float64_reference(kernel, cfg):
    with launch.override(kernel, cfg):
        CHECKS[kernel]()


@pytest.mark.parametrize("kernel", launch.KERNELS)
def test_table_and_rule_give_every_parameter(kernel):
    for n in (1, 7, 96, *SIZES, 65536):
        cfg = launch.config(kernel, n)
        assert PARAMS[kernel] <= set(cfg) <= PARAMS[kernel] | OPTIONAL.get(kernel, set()), (kernel, n, cfg)
        assert all(isinstance(v, int) and v >= 1 for v in cfg.values()), (kernel, n, cfg)
        for key in ("ROWS", "BLOCK", "num_warps"):
            if key in cfg:
                assert cfg[key] & (cfg[key] - 1) == 0, f"{kernel} {key} must be a power of two: {cfg}"
    for (name, _), cfg in launch.TABLE.items():
        assert PARAMS[name] <= set(cfg) <= PARAMS[name] | OPTIONAL.get(name, set()), (name, cfg)


def test_override_is_scoped_and_checked():
    before = launch.config("rms_norm_fwd", 1280)
    with launch.override("rms_norm_fwd", dict(ROWS=2, num_warps=2)):
        assert launch.config("rms_norm_fwd", 7168) == dict(ROWS=2, num_warps=2)
    assert launch.config("rms_norm_fwd", 1280) == before
    with pytest.raises(KeyError):
        with launch.override("no_such_kernel", {}):
            pass


def test_norm_backward_is_bitwise_reproducible():
    """Fixed reduction order: the same inputs give the same bits (the weight gradient included)."""
    g = torch.Generator().manual_seed(3)
    x, w = torch.randn(37, 80, generator=g), torch.randn(80, generator=g)
    cot = torch.randn(37, 80, generator=g)
    runs = []
    for _ in range(2):
        xs, ws = x.clone().requires_grad_(), w.clone().requires_grad_()
        runs.append(torch.autograd.grad(PKG.norm.rms_norm(xs, ws), (xs, ws), cot))
    assert all(torch.equal(a, b) for a, b in zip(*runs))


# -- no kernel warns when compiled ------------------------------------------------------------------

def test_no_kernel_warns_when_compiled_for_h100(monkeypatch, tmp_path):
    """Each kernel the op samples launch, compiled for sm_90 as launched, must emit no warning (e.g.
    "Logical operators 'and' and 'or' are deprecated for non-scalar tensors"); the default memops configs
    are among them. Attention's and FP8's kernels have their own compile tests at their GPU configs (the
    interpreter launches the FP8 GEMMs' 128 x 128 tiles with one warp, which takes ptxas minutes)."""
    from benchmark_scripts import load_script, require_sm90_compiler

    require_sm90_compiler("ptxas")
    monkeypatch.setenv("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, without its own warning
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))  # a cached kernel is not compiled again (nor warns)
    script = load_script("ops/memops_sm90_resources.py")
    seen = script.record_launches(_one_sample_per_op)
    compiled = {}
    for name, module, args, kwargs in seen:
        if (module, name) in compiled:
            continue
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            script.compile_launch(name, module, args, kwargs)
        compiled[(module, name)] = [f"{w.filename}:{w.lineno}: {w.message}" for w in caught]
    assert len(compiled) >= 10, sorted(compiled)
    assert not {k: v for k, v in compiled.items() if v}, {k: v for k, v in compiled.items() if v}


def _one_sample_per_op() -> None:
    """Forward and backward of each op's first sample (bf16; attention's and FP8's kernels excluded)."""
    gen = torch.Generator().manual_seed(0)
    for op, impl in PKG.KERNELS.items():
        if op == "causal_attention" or op.startswith("fp8"):
            continue
        opdef = get(op)
        sample = next(iter(opdef.samples(torch.bfloat16 if op != "adamw" else torch.float32, torch.device("cpu"),
                                         gen)))
        args = [a.detach().clone().requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point()
                and opdef.differentiable else a for a in sample.args]
        out = [o for o in torch.utils._pytree.tree_leaves(impl(*args, **sample.kwargs))
               if isinstance(o, torch.Tensor) and o.requires_grad]
        if out:
            torch.autograd.grad(out, [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad],
                                [torch.ones_like(o) for o in out], allow_unused=True)


def test_memops_sweep_runs_a_row_on_the_cpu(monkeypatch, tmp_path, capsys):
    """The GPU sweep script's plumbing (cases, overrides, checks, best config, table line) on the
    interpreter at 8 rows, with a fake clock-free timer; no numbers are meaningful here."""
    import json

    from benchmark_scripts import load_script

    from openseek_hal.ops import bench, bench_cases

    sweep = load_script("ops/memops_sweep.py")
    original = bench_cases._randn

    def small(*shape, **kw):  # 8 rows of the case's own width
        return original(*((min(shape[0], 8),) + shape[1:] if len(shape) > 1 else shape), **kw)

    calls = iter(range(1, 10**6))
    monkeypatch.setattr(bench_cases, "_randn", small)
    monkeypatch.setattr(bench, "_median_ms", lambda fn: (fn(), float(next(calls)))[1])
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)
    candidates = launch.candidates
    monkeypatch.setattr(launch, "candidates", lambda kernel, n: candidates(kernel, n)[:3])
    rows = [r for r in sweep.ROWS if r[4] <= 4096 and r[3] in ("rms_norm_fwd", "add_rms_norm_bwd", "silu_and_mul_fwd",
                                                                 "moe_route_bwd")]
    assert len(rows) == 6
    for row in rows:
        out = sweep.sweep_row(row, torch.device("cpu"), 1e12, float("inf"), float("inf"), interpret=True)
        configs = out["configs"]
        assert configs[0]["default"] and configs[0]["config"] == launch.config(row[3], row[4])
        assert configs[0].get("ok_vs_reference") is True, configs[0]
        assert all(c["ok"] and "ms" in c for c in configs), [c for c in configs if not c.get("ok")]
        assert out["best"] == configs[0]["config"]  # the fake timer makes the first the fastest
        assert "compile" in out["baselines"] and "ms" in out["baselines"]["compile"]
        assert sweep._table_line(out).startswith(f'    ("{row[3]}", {row[4]}): dict(')
    monkeypatch.setattr(bench, "copy_bandwidth", lambda device: 1e12)
    sweep.main([str(tmp_path), "--interpret", "--rows", "moe_route openseek-small,16384x2*2560 bwd"])
    out = capsys.readouterr().out
    assert '("moe_route_bwd", 64): dict(' in out and "(guard)" in out and "results:" in out
    saved = json.loads((tmp_path / "memops_sweep.json").read_text())
    assert [r["guard"] for r in saved["rows"]] == [False, True] and saved["provenance"] and "warnings" in saved
    assert len(saved["rows"][1]["configs"]) == 2  # a guard row: the default and the previous launch
    # --timing graph: each config and baseline timed by the bench's graph path, one direction only
    graphs: list[int] = []

    def fake_graph_ms(fns, stream):
        for fn in fns:
            fn()
        graphs.append(len(fns))
        return float(next(calls))

    monkeypatch.setattr(bench, "_graph_ms", fake_graph_ms)
    for row in (rows[0], next(r for r in rows if r[2] == "bwd")):
        graphs.clear()
        out = sweep.sweep_row(row, torch.device("cpu"), 1e12, float("inf"), float("inf"), interpret=True,
                              timing="graph")
        timed = [c for c in out["configs"] if "ms" in c] + [b for b in out["baselines"].values() if "ms" in b]
        assert all(c["ok"] for c in out["configs"]) and len(graphs) == len(timed) >= 4  # one graph each
        assert out["best"] == out["configs"][0]["config"]


def test_norm_bwd_sweep_runs_its_rows_on_the_cpu(tmp_path, capsys):
    """The graph-timed norm backward sweep's plumbing on the interpreter (8 rows of each training-step shape,
    the strided latent included, three candidates and three wider grids, timed by wall clock: no number is
    meaningful): every config's gradients agree with the default launch's, and a `launch.TABLE` line is
    printed per row."""
    import json

    from benchmark_scripts import load_script

    sweep = load_script("ops/norm_bwd_sweep.py")
    sweep.main([str(tmp_path), "--interpret", "--reps", "1"])
    out = capsys.readouterr().out
    saved = json.loads((tmp_path / "norm_bwd_sweep.json").read_text())
    assert [r["n"] for r in saved["results"]] == [1280, 512, 1280] and saved["results"][1]["stride"] == 576
    for result in saved["results"]:
        assert result["default"]["config"] == launch.config(result["kernel"], result["n"])
        assert all(e.get("ok") for e in result["entries"]), [e for e in result["entries"] if not e.get("ok")]
        assert len(result["entries"]) == 6  # three candidates, three wider grids
    assert out.count("TABLE: (") == 3 and "('rms_norm_bwd', 512): dict(" in out


def test_grad_norm_bench_runs_on_the_cpu(tmp_path, capsys):
    """The gradient-norm benchmark's plumbing on the tiny model (interpreted Triton kernel, wall-clock stand-in
    timer: no number is meaningful): both implementations' sums within the op's error bound of the float64 sum,
    the gradients bucketed as the trainer buckets them."""
    import json

    from benchmark_scripts import load_script

    from openseek_hal.models import build_model

    bench = load_script("ops/grad_norm_bench.py")
    bench.main([str(tmp_path), "--cpu", "--model", "tiny", "--reps", "1", "--bucket-mb", "0.25"])
    saved = json.loads((tmp_path / "grad_norm_bench.json").read_text())
    meta = build_model("tiny", "cpu", device="meta", num_nextn_predict_layers=0)
    numel = sum(p.numel() for p in meta.parameters() if p.requires_grad)
    assert saved["elements"] == numel and saved["buckets"] > 1
    assert [r["variant"].split()[0] for r in saved["rows"]] == ["copy", "torch", "triton"]
    for row in saved["rows"][1:]:  # (n + 1) u: the bound of any summation order in float32 (OpDef.error_scale)
        assert row["relative_error"] <= (numel + 1) * 2.0**-24, row
    assert "triton partials per bucket" in capsys.readouterr().out
