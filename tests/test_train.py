"""The end-to-end train loop: the loss falls, checkpoints are atomic and resume exactly."""

from __future__ import annotations

import json
import math
import sys
import types

import pytest
import torch
from rich.console import Console
from safetensors import safe_open
from tokenizers import Tokenizer

from openseek_hal.errors import RunError
from openseek_hal.models import DeepseekV3, ModelLoss, build_model
from openseek_hal.train.checkpoint import load_checkpoint, resolve_checkpoint
from openseek_hal.train.config import load_config, model_config
from openseek_hal.train.schedule import lr_at
from openseek_hal.train.trainer import train

TINY = {"global_batch_size": 8, "seq_len": 32, "lr": 1e-2, "warmup_steps": 3, "tokenizer_vocab_size": 512,
        "sample_tokens": 8, "eval_batches": 2, "log_every": 5, "model.num_hidden_layers": 2}


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENSEEK_HAL_CACHE", str(tmp_path / "cache"))


def _cfg(tmp_path, **kw):
    return load_config(None, {**TINY, "out": str(tmp_path / "run"), **kw})


def _quiet() -> Console:
    return Console(file=open("/dev/null", "w"))  # noqa: SIM115


def test_loss_falls_and_checkpoint_reloads(backend_name, tmp_path):
    cfg = _cfg(tmp_path, backend=backend_name, steps=40)
    result = train(cfg, console=_quiet())
    assert len(result.losses) == 40
    assert result.losses[0] > 5.5  # about ln(512) at initialization
    assert sum(result.losses[-5:]) / 5 < result.losses[0] - 0.8
    assert result.val_loss < result.losses[0]
    assert result.sample.startswith("The ")
    ckpt = resolve_checkpoint(tmp_path / "run")
    assert ckpt.name == "step_000040"
    assert sorted(p.name for p in ckpt.iterdir()) == ["manifest.json", "rank_00000.safetensors", "state.json"]
    assert not [p for p in ckpt.parent.iterdir() if p.name.startswith(".")]  # no temp leftovers
    # the saved weights give back the trained model's logits
    from openseek_hal.backend import get_backend

    vocab = Tokenizer.from_file(str(tmp_path / "run" / "tokenizer.json")).get_vocab_size()
    model = build_model(model_config(cfg, vocab_size=vocab), get_backend(backend_name), init=False)
    state = load_checkpoint(tmp_path / "run", model)
    model.eval()
    x = torch.randint(0, vocab, (2, 16), device=model.embed_tokens.weight.device)
    assert torch.isfinite(model(x)).all()
    assert state["step"] == 40 and state["losses"] == result.losses
    assert (tmp_path / "run" / "tokenizer.json").is_file()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [5, 10, 15, 20, 25, 30, 35, 40, 40]
    assert rows[-2]["loss"] == result.losses[-1] and rows[-1]["val_loss"] == result.val_loss


# bf16: fp32 masters kept as remainders of the weights; with bf16 moments: a GPU's default regime, on the CPU
@pytest.mark.parametrize("dtype,moments", [("auto", "auto"), ("bf16", "auto"), ("bf16", "bf16")])
def test_resume_is_exact(tmp_path, dtype, moments):
    straight = train(_cfg(tmp_path / "a", steps=8, save_every=4, dtype=dtype, moment_dtype=moments),
                     console=_quiet())
    ckpt = tmp_path / "a" / "run" / "checkpoints" / "step_000004"
    assert json.loads((ckpt / "state.json").read_text())["step"] == 4
    with safe_open(str(ckpt / "rank_00000.safetensors"), "pt") as f:  # the moments as the run kept them
        kept = {f.get_tensor(k).dtype for k in f.keys() if k.startswith("optim/") and "/exp_avg" in k}
    assert kept == {torch.bfloat16 if moments == "bf16" else torch.float32}
    resumed = train(_cfg(tmp_path / "b", steps=8, dtype=dtype, moment_dtype=moments), resume=ckpt,
                    console=_quiet())
    assert resumed.losses == straight.losses  # bitwise: same batches, same optimizer state


def test_lr_schedule():
    cfg = load_config(None, {"steps": 100, "warmup_steps": 10, "lr": 1.0, "min_lr_ratio": 0.1})
    assert lr_at(0, cfg) == pytest.approx(0.1)
    assert lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(99, cfg) == pytest.approx(0.1, abs=1e-3)
    assert lr_at(55, cfg) == pytest.approx(0.55)


def test_jsonl_data_with_malformed_lines(tmp_path):
    data = tmp_path / "d.jsonl"
    lines = [json.dumps({"text": f"document {i} says hello to the training loop. " * 20}) for i in range(30)]
    lines.insert(3, "{not json")
    lines.insert(7, json.dumps({"body": "no text field"}))
    data.write_text("\n".join(lines) + "\n")
    from openseek_hal.train.corpus import read_documents

    docs = read_documents(str(data))
    assert len(docs.texts) == 30
    assert [(ln, why.split()[0]) for _, ln, why in docs.skipped] == [(4, "Expecting"), (8, "missing")]
    result = train(_cfg(tmp_path, steps=3, data=str(data)), console=_quiet())
    assert len(result.losses) == 3 and all(torch.isfinite(torch.tensor(result.losses)))


def test_wandb_logs_offline(tmp_path, monkeypatch):
    calls = []

    class FakeRun:
        def log(self, metrics, step):
            calls.append(("log", step, sorted(metrics)))

        def finish(self):
            calls.append(("finish",))

    fake = types.ModuleType("wandb")
    fake.init = lambda **kw: calls.append(("init", kw["mode"], kw["project"])) or FakeRun()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    train(_cfg(tmp_path, steps=5, wandb="true"), console=_quiet())
    assert calls[0] == ("init", "offline", "openseek-hal")
    logged = {"aux_loss", "grad_norm", "loss", "lr", "mtp_loss", "tokens_per_s", "tokens_per_s_per_device",
              "peak_memory_mib", "forward_ms", "backward_ms", "grad_sync_ms", "optimizer_ms", "weight_sync_ms",
              "optimizer_overlapped_ms"}
    assert ("log", 5, sorted(logged)) in calls
    assert calls[-1] == ("finish",)


def test_diverged_loss_is_one_clear_error(tmp_path, monkeypatch):
    real_loss = DeepseekV3.loss

    def poisoned(self, x, y, **kwargs):
        out = real_loss(self, x, y, **kwargs)
        return ModelLoss(total=out.total * float("nan"), main=out.main * float("nan"), mtp=out.mtp, aux=out.aux)

    monkeypatch.setattr(DeepseekV3, "loss", poisoned)
    with pytest.raises(RunError, match="loss became nan at step 1"):
        train(_cfg(tmp_path, steps=3), console=_quiet())


class _NanGradient(torch.autograd.Function):
    """Identity forward, NaN backward: a finite loss whose gradient is not."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * float("nan")


def test_diverged_gradient_norm_names_its_step_and_writes_no_checkpoint(tmp_path, monkeypatch):
    real_loss = DeepseekV3.loss
    calls = []

    def poisoned(self, x, y, **kwargs):
        out = real_loss(self, x, y, **kwargs)
        calls.append(1)
        if len(calls) == 4:  # the loss stays finite; the gradient norm (read on the device) does not
            return ModelLoss(total=_NanGradient.apply(out.total), main=out.main, mtp=out.mtp, aux=out.aux)
        return out

    monkeypatch.setattr(DeepseekV3, "loss", poisoned)
    with pytest.raises(RunError, match="the gradient norm became nan at step 4"):
        train(_cfg(tmp_path, steps=6, save_every=5, log_every=5), console=_quiet())
    checkpoints = tmp_path / "run" / "checkpoints"
    assert not checkpoints.exists() or not any(checkpoints.iterdir())


def test_trains_on_token_shards_from_data_tokenize(tmp_path):
    from openseek_hal.cli import main
    from openseek_hal.data.shards import TokenShards

    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": f"Shard document {i}: the quick brown fox jumps over the lazy dog. "
                                                * 12}) + "\n" for i in range(40)))
    with pytest.raises(SystemExit) as exit_info:
        main(["data", "tokenize", str(data), "-o", str(tmp_path / "tok"), "--vocab-size", "300",
              "--shard-tokens", "2000", "-q"])
    assert exit_info.value.code == 0
    shards = TokenShards(tmp_path / "tok")
    assert len(shards.shards) > 1  # several shards, read as one sequence
    result = train(_cfg(tmp_path, steps=3, data=str(tmp_path / "tok")), console=_quiet())
    assert len(result.losses) == 3 and result.losses[0] == pytest.approx(math.log(shards.vocab_size), abs=0.6)
    # the run uses the shards' own tokenizer
    assert (tmp_path / "run" / "tokenizer.json").read_bytes() == shards.tokenizer_path.read_bytes()


def test_batch_must_split_over_the_ranks():
    from openseek_hal.errors import ConfigError
    from openseek_hal.train.config import check_world

    cfg = load_config(None, {"global_batch_size": 8, "micro_batch_size": 3})
    with pytest.raises(ConfigError, match="does not split over 3 data-parallel ranks"):
        check_world(cfg, 3)
    with pytest.raises(ConfigError, match="micro_batch_size 3 does not divide the 4 sequences per rank"):
        check_world(cfg, 2)
    assert check_world(load_config(None, {"global_batch_size": 8, "micro_batch_size": 2}), 2) == (2, 2, 2)


def test_profile_step_writes_a_trace_and_tables_of_the_profiled_steps(tmp_path):
    import gzip

    train(_cfg(tmp_path, steps=4, profile_step=2), console=_quiet())
    folder = tmp_path / "run" / "profile"
    assert sorted(p.name for p in folder.iterdir()) == ["rank0-device.txt", "rank0-host.txt", "rank0-shapes.txt",
                                                         "rank0-summary.json", "rank0.trace.json.gz"]
    summary = json.loads((folder / "rank0-summary.json").read_text())
    assert summary["steps"] == [2, 3] and summary["wall_ms"] > 0
    trace = json.loads(gzip.decompress((folder / "rank0.trace.json.gz").read_bytes()))
    names = {e.get("name", "") for e in trace["traceEvents"]}
    assert {"aten::embedding", "aten::mm"} <= names  # the model's forward and backward ran inside the span
    assert "aten::mm" in (folder / "rank0-host.txt").read_text()
    # operators split by input shape: several aten::mm rows, one of them the 256 tokens x hidden 128 of a step
    mm_rows = [line for line in (folder / "rank0-shapes.txt").read_text().splitlines() if "aten::mm " in line]
    assert len(mm_rows) > 1 and any("[[256, 128], " in row for row in mm_rows)


def test_checkpoints_carry_the_kernel_choices_and_a_resume_presets_them(tmp_path, monkeypatch):
    """A backend that picks kernels by timing (cuda: attention, the FP8 GEMM) reports its decisions; each
    checkpoint saves them, and a resume presets them before its first step, so it computes like the run it
    continues."""
    from openseek_hal.backends.cpu import CPUBackend

    saved = {"causal_attention": [{"B": 2, "H": 4, "S": 64, "Dqk": 24, "Dv": 16, "dtype": "float32",
                                   "cu_seqlens": False, "choice": "sdpa", "fwd_bwd_ms": {"sdpa": 1.0},
                                   "errors": {}}]}
    preset = []
    monkeypatch.setattr(CPUBackend, "op_choices", lambda self: saved)
    monkeypatch.setattr(CPUBackend, "preset_op_choices", lambda self, choices: preset.append(choices))
    train(_cfg(tmp_path / "a", steps=4, save_every=2), console=_quiet())
    ckpt = tmp_path / "a" / "run" / "checkpoints" / "step_000002"
    assert json.loads((ckpt / "state.json").read_text())["op_choices"] == saved
    assert preset == []
    train(_cfg(tmp_path / "b", steps=4), resume=ckpt, console=_quiet())
    assert preset == [saved]
