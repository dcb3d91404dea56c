"""`openseek-hal convert` and the native checkpoint format: round trips, sharding, bad input."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from openseek_hal.cli import main
from openseek_hal.models import build_model, load_hf, load_native, save_hf, save_native
from openseek_hal.models.checkpoint_io import CheckpointError

CONFIG = dict(vocab_size=53, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=2,
              num_attention_heads=2, num_key_value_heads=2, n_routed_experts=4, num_experts_per_tok=2, n_group=1,
              topk_group=1, first_k_dense_replace=1, q_lora_rank=8, kv_lora_rank=16, qk_rope_head_dim=8,
              qk_nope_head_dim=8, v_head_dim=8, num_nextn_predict_layers=1, initializer_range=0.1)


def run_cli(*args: str) -> int:
    with pytest.raises(SystemExit) as info:
        main(list(args))
    return info.value.code


def all_tensors(directory) -> dict[str, torch.Tensor]:
    out = {}
    for shard in sorted(directory.glob("*.safetensors")):
        out.update(load_file(shard))
    return out


@pytest.fixture
def model():
    model = build_model(CONFIG, "cpu", seed=0).eval()
    with torch.no_grad():
        for m in model.moe_layers():
            m.gate.e_score_correction_bias.normal_(0, 0.1)
    return model


def test_convert_round_trip_hf_native_hf(model, tmp_path, capsys):
    save_hf(model, tmp_path / "hf")
    code = run_cli("convert", "--from", "hf", "--to", "native", "--shard-size", "20KB",
                   str(tmp_path / "hf"), str(tmp_path / "native"))
    assert code == 0, capsys.readouterr().err
    index = json.loads((tmp_path / "native" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 3  # sharded as asked
    assert set(index["weight_map"]) == set(model.state_dict())
    native = load_native(tmp_path / "native", "cpu").eval()
    ids = torch.randint(0, 53, (2, 9))
    with torch.no_grad():
        assert torch.equal(native(ids), model(ids))
    assert run_cli("convert", "--from", "native", "--to", "hf", str(tmp_path / "native"), str(tmp_path / "back")) == 0
    original, back = all_tensors(tmp_path / "hf"), all_tensors(tmp_path / "back")
    assert original.keys() == back.keys()
    assert all(torch.equal(original[k], back[k]) for k in original)


def test_convert_casts_dtype_and_native_save_load(model, tmp_path):
    save_native(model, tmp_path / "n32")
    assert run_cli("convert", "--from", "native", "--to", "native", "--dtype", "bfloat16",
                   str(tmp_path / "n32"), str(tmp_path / "n16")) == 0
    tensors = all_tensors(tmp_path / "n16")
    assert tensors["embed_tokens.weight"].dtype == torch.bfloat16
    assert tensors["layers.1.mlp.gate.e_score_correction_bias"].dtype == torch.float32  # the bias keeps float32
    loaded = load_native(tmp_path / "n16", "cpu")
    assert loaded.embed_tokens.weight.dtype == torch.bfloat16
    assert torch.equal(loaded.embed_tokens.weight, model.embed_tokens.weight.to(torch.bfloat16))
    meta = json.loads((tmp_path / "n16" / "config.json").read_text())
    assert meta["format"] == "openseek-hal-native" and meta["config"]["mtp_loss_weight"] == 0.3


def test_bad_input_gives_one_clear_error(model, tmp_path, capsys):
    assert run_cli("convert", "--from", "hf", "--to", "native", str(tmp_path / "nope"), str(tmp_path / "out")) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "not found" in err and "Traceback" not in err

    save_hf(model, tmp_path / "hf", max_shard_bytes=30_000)
    shard = sorted((tmp_path / "hf").glob("*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[:-100])  # truncated
    assert run_cli("convert", "--from", "hf", "--to", "native", str(tmp_path / "hf"), str(tmp_path / "out")) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and shard.name in err and "not a valid safetensors" in err
    assert not (tmp_path / "out").exists()

    save_native(model, tmp_path / "native")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("mine")
    assert run_cli("convert", "--from", "native", "--to", "hf", str(tmp_path / "native"), str(tmp_path / "busy")) == 2
    assert "not empty" in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "busy").iterdir()] == ["keep.txt"]

    assert run_cli("convert", "--from", "hf", "--to", "hf", str(tmp_path / "native"), str(tmp_path / "o2")) == 2
    assert "is an openseek-hal-native checkpoint, not a Hugging Face one" in capsys.readouterr().err
    assert run_cli("convert", "--from", "native", "--to", "hf", "--shard-size", "lots",
                   str(tmp_path / "native"), str(tmp_path / "o3")) == 2
    assert "not a size" in capsys.readouterr().err


def test_load_hf_reports_missing_tensors(model, tmp_path):
    save_hf(model, tmp_path / "hf")
    tensors = all_tensors(tmp_path / "hf")
    del tensors["model.layers.1.mlp.experts.3.up_proj.weight"]
    for shard in (tmp_path / "hf").glob("*.safetensors"):
        shard.unlink()
    (tmp_path / "hf" / "model.safetensors.index.json").unlink()
    save_file(tensors, tmp_path / "hf" / "model.safetensors")
    with pytest.raises(CheckpointError, match="experts.3.up_proj"):
        load_hf(tmp_path / "hf", "cpu")


def test_writer_is_atomic_and_overwrites_only_when_asked(model, tmp_path):
    from openseek_hal.models.checkpoint_io import ShardedWriter

    with pytest.raises(RuntimeError), ShardedWriter(tmp_path / "ckpt") as writer:
        writer.add("a", torch.ones(3))
        raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []  # neither the destination nor a partial directory

    save_native(model, tmp_path / "ckpt")
    with pytest.raises(CheckpointError, match="not empty"):
        save_native(model, tmp_path / "ckpt")
    with torch.no_grad():
        model.norm.weight.fill_(2.0)
    save_native(model, tmp_path / "ckpt", overwrite=True)
    assert torch.equal(load_native(tmp_path / "ckpt", "cpu").norm.weight, model.norm.weight)
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]
