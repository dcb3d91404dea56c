"""The HAL contract: discovery through entry points, default selection, op fallback and strict mode."""

from __future__ import annotations

import textwrap
import warnings

import pytest
import torch

import openseek_hal
from openseek_hal import ops
from openseek_hal.backend import (
    Backend,
    Capabilities,
    OpFallbackWarning,
    default_backend_name,
    discover,
    get_backend,
    list_backends,
    register_backend,
    unregister_backend,
)
from openseek_hal.errors import BackendUnavailableError, MissingOpError, UnknownBackendError


class HalfBackend(Backend):
    """A CPU backend with one native op (a deliberately different rms_norm) and the rest missing."""

    name = "half-test"
    device_type = "cpu"

    @classmethod
    def is_available(cls):
        return True, ""

    def native_ops(self):
        return {"rms_norm": lambda x, w, eps=1e-6: torch.full_like(x, 7.0)}

    def capabilities(self):
        return Capabilities(device_name="test", dtypes=(torch.float32,))


@pytest.fixture
def half_backend():
    register_backend(HalfBackend)
    Backend._warned.clear()
    yield get_backend("half-test")
    unregister_backend("half-test")


def test_in_tree_backends_are_discovered_through_entry_points():
    found, errors = discover(refresh=True)
    assert {"cpu", "cuda"} <= set(found)
    assert found["cpu"].__module__ == "openseek_hal.backends.cpu"
    assert not errors


def test_cpu_available_and_cuda_reports_why_not():
    infos = {i.name: i for i in list_backends()}
    assert infos["cpu"].available and infos["cpu"].reason == ""
    if not torch.cuda.is_available():
        assert not infos["cuda"].available
        assert "CUDA" in infos["cuda"].reason
        with pytest.raises(BackendUnavailableError, match="backend 'cuda' is not available"):
            get_backend("cuda")


def test_unknown_backend_lists_choices():
    with pytest.raises(UnknownBackendError) as exc:
        get_backend("no-such-chip")
    assert "no-such-chip" in str(exc.value) and "cpu" in str(exc.value)


def test_default_backend_env_and_priority(monkeypatch):
    monkeypatch.delenv("OPENSEEK_HAL_BACKEND", raising=False)
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert default_backend_name() == expected
    monkeypatch.setenv("OPENSEEK_HAL_BACKEND", "cpu")
    assert get_backend().name == "cpu"


def test_native_op_is_used_and_missing_op_falls_back_once(half_backend):
    x = torch.randn(3, 4)
    assert torch.equal(half_backend.op("rms_norm")(x, torch.ones(4)), torch.full_like(x, 7.0))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = half_backend.op("silu_and_mul")
        half_backend.op("silu_and_mul")
        get_backend("half-test").op("silu_and_mul")  # a second instance does not warn again
    fallback = [w for w in caught if issubclass(w.category, OpFallbackWarning)]
    assert len(fallback) == 1 and "silu_and_mul" in str(fallback[0].message)
    assert first is ops.get("silu_and_mul").reference
    cov = half_backend.coverage()
    assert cov["rms_norm"] == "native" and cov["silu_and_mul"] == "fallback"
    assert set(cov) == set(ops.names())


def test_strict_mode_raises_instead_of_falling_back(half_backend, monkeypatch):
    strict = get_backend("half-test", strict=True)
    with pytest.raises(MissingOpError, match="silu_and_mul"):
        strict.op("silu_and_mul")
    monkeypatch.setenv("OPENSEEK_HAL_STRICT", "1")
    with pytest.raises(MissingOpError):
        get_backend("half-test").op("rope")


def test_unknown_op_name():
    with pytest.raises(KeyError, match="unknown op 'nope'"):
        get_backend("cpu").op("nope")


def test_cpu_backend_is_all_native(backend):
    cov = backend.coverage()
    assert set(cov) == set(ops.names())
    if backend.name == "cpu":
        assert set(cov.values()) == {"native"}


def _write_plugin(root, dist: str, entry_lines: str, modules: dict[str, str]) -> None:
    info = root / f"{dist}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[openseek_hal.backends]\n{entry_lines}\n")
    for name, src in modules.items():
        (root / f"{name}.py").write_text(textwrap.dedent(src))


def test_plugin_that_raises_on_import_is_reported_and_others_still_load(tmp_path, monkeypatch):
    _write_plugin(tmp_path, "broken_plugin", "broken = broken_chip:Backend",
                  {"broken_chip": "raise ImportError('vendor SDK libfoo.so not found')"})
    _write_plugin(tmp_path, "good_plugin", "good = good_chip:detect", {"good_chip": """
        import torch
        from openseek_hal.backend import Backend, Capabilities

        class GoodBackend(Backend):
            name = "good"
            device_type = "cpu"
            @classmethod
            def is_available(cls):
                return True, ""
            def native_ops(self):
                return {}
            def capabilities(self):
                return Capabilities(device_name="good", dtypes=(torch.float32,))

        def detect():  # vLLM-style: a function naming the class, importing nothing heavy
            return "good_chip:GoodBackend"
        """})
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        found, errors = discover(refresh=True)
        assert "good" in found and "cpu" in found
        assert "broken" in errors and "libfoo.so" in errors["broken"]
        infos = {i.name: i for i in list_backends()}
        assert not infos["broken"].available and "failed to load" in infos["broken"].reason
        assert get_backend("good").op("rms_norm") is ops.get("rms_norm").reference
        with pytest.raises(BackendUnavailableError, match="libfoo.so"):
            get_backend("broken")
    finally:
        monkeypatch.undo()
        discover(refresh=True)


def test_import_does_not_need_an_accelerator():
    assert openseek_hal.__version__
    dev = get_backend("cpu").device
    assert dev.count() == 1 and dev.torch_device == torch.device("cpu")
    dev.synchronize()
    assert dev.memory_stats()["peak_allocated"] > 0


def test_public_api_is_complete_and_lazy():
    import subprocess
    import sys

    assert sorted(openseek_hal.__all__) == sorted([*openseek_hal._MODULE_OF, "__version__"])
    for name in openseek_hal._MODULE_OF:
        assert getattr(openseek_hal, name) is not None
    # the data tools and `--help` must not pay for importing torch
    code = "import sys, openseek_hal, openseek_hal.data.cli; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


_PLUGIN = """
    import torch
    from openseek_hal.backend import Backend, Capabilities

    class ChipBackend(Backend):
        name = {name!r}
        device_type = "cpu"
        priority = {priority}
        @classmethod
        def is_available(cls):
            return True, ""
        def native_ops(self):
            return {{}}
        def capabilities(self):
            return Capabilities(device_name="chip", dtypes=(torch.float32,))
    """


def test_a_plugin_never_silently_takes_the_default_or_a_name(tmp_path, monkeypatch):
    monkeypatch.delenv("OPENSEEK_HAL_BACKEND", raising=False)
    _write_plugin(tmp_path, "zchip_plugin", "zchip = zchip_mod:ChipBackend",
                  {"zchip_mod": _PLUGIN.format(name="zchip", priority=0)})  # ties with cpu, sorts after it
    _write_plugin(tmp_path, "a_plugin", "dup = dup_a:ChipBackend", {"dup_a": _PLUGIN.format(name="dup", priority=0)})
    _write_plugin(tmp_path, "b_plugin", "dup = dup_b:ChipBackend", {"dup_b": _PLUGIN.format(name="dup", priority=0)})
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        found, errors = discover(refresh=True)
        assert "zchip" in found
        if not torch.cuda.is_available():
            assert default_backend_name() == "cpu"  # equal priority: the in-tree backend stays the default
        assert "dup" not in found
        assert "'a_plugin'" in errors["dup"] and "'b_plugin'" in errors["dup"]
        with pytest.raises(BackendUnavailableError, match="registered by more than one package"):
            get_backend("dup")
    finally:
        monkeypatch.undo()
        discover(refresh=True)


def test_a_plugin_reusing_an_in_tree_name_is_a_loud_error(tmp_path, monkeypatch):
    _write_plugin(tmp_path, "fake_cpu_plugin", "cpu = fake_cpu:ChipBackend",
                  {"fake_cpu": _PLUGIN.format(name="cpu", priority=0)})
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        found, errors = discover(refresh=True)
        assert "cpu" not in found and "'openseek-hal'" in errors["cpu"] and "'fake_cpu_plugin'" in errors["cpu"]
    finally:
        monkeypatch.undo()
        discover(refresh=True)


def test_slow_and_op_origins_are_part_of_the_contract():
    from openseek_hal.backends.triton_interpret import TritonInterpretBackend

    assert Backend.slow is False and TritonInterpretBackend.slow is True
    assert get_backend("cpu").op_origins() == {}  # every native op is the backend's own
