"""Parity with transformers' DeepseekV3ForCausalLM: load_hf, save_hf, FP8 checkpoints, MTP layers.

Small random HF models are built from configs (no downloads), saved, loaded with `load_hf`, and
their float32 logits compared (relative error <= 1e-4).
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from openseek_hal.models import build_model, load_hf, save_hf

transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "DeepseekV3ForCausalLM"):
    pytest.skip("this transformers has no DeepseekV3ForCausalLM", allow_module_level=True)

BASE = dict(
    vocab_size=97, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
    num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, num_experts_per_tok=2, n_group=1,
    topk_group=1, first_k_dense_replace=1, q_lora_rank=None, kv_lora_rank=32, qk_rope_head_dim=8,
    qk_nope_head_dim=16, v_head_dim=16, n_shared_experts=1, max_position_embeddings=128, norm_topk_prob=True,
    routed_scaling_factor=2.5, rope_interleave=True, tie_word_embeddings=False, initializer_range=0.1,
)

CASES = {
    "plain": {},
    "q_lora+bias": dict(q_lora_rank=24, attention_bias=True),
    "groups+bias": dict(n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=4),
    "no_norm_topk": dict(norm_topk_prob=False, n_shared_experts=2),
    "all_moe": dict(first_k_dense_replace=0),
    "two_dense": dict(first_k_dense_replace=2),
    # factor == max_position_embeddings / original, as in DeepSeek's config (transformers < 4.56 derives it so)
    "yarn": dict(max_position_embeddings=64, rope_scaling={
        "type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "beta_fast": 32, "beta_slow": 1,
        "mscale": 1.0, "mscale_all_dim": 0.8}),
    "tied+half_rope": dict(tie_word_embeddings=True, rope_interleave=False),
}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double().cpu() - b.double().cpu()).abs().max() / b.double().abs().max()).item()


def make_hf_model(seed: int = 0, **overrides) -> transformers.DeepseekV3ForCausalLM:
    torch.manual_seed(seed)
    config = transformers.DeepseekV3Config(**{**BASE, **overrides})
    config._attn_implementation = "eager"
    model = transformers.DeepseekV3ForCausalLM(config).eval()
    with torch.no_grad():  # HF starts norms at 1 and biases at 0: make them carry information
        for name, tensor in model.state_dict().items():
            if "norm" in name:
                tensor.copy_(1 + 0.2 * torch.randn_like(tensor))
            elif name.endswith("e_score_correction_bias"):
                tensor.copy_(0.05 * torch.randn_like(tensor))
            elif name.endswith(".bias"):  # attention_bias: HF starts them at 0
                tensor.copy_(0.1 * torch.randn_like(tensor))
    return model


def hf_logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.fixture
def ids() -> torch.Tensor:
    return torch.randint(0, BASE["vocab_size"], (2, 40), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("case", list(CASES))
def test_load_hf_matches_transformers(case, tmp_path, ids, backend):
    hf = make_hf_model(**CASES[case])
    hf.save_pretrained(tmp_path / "hf")
    ours = load_hf(tmp_path / "hf", backend, dtype=torch.float32).eval()
    assert ours.config.num_nextn_predict_layers == 0  # transformers does not save the MTP layer
    with torch.no_grad():
        got = ours(ids.to(backend.device.torch_device))
    assert got.shape == (2, 40, BASE["vocab_size"])
    assert rel_err(got, hf_logits(hf, ids)) <= 1e-4


def test_save_hf_round_trip_through_transformers(tmp_path, ids):
    ours = build_model(dict(BASE, first_k_dense_replace=1, q_lora_rank=24, num_nextn_predict_layers=1,
                            n_group=2, topk_group=1), "cpu", seed=3).eval()
    with torch.no_grad():
        for m in ours.moe_layers():
            m.gate.e_score_correction_bias.normal_(0, 0.05)
        expected, expected_mtp = ours.forward_with_mtp(ids)
    save_hf(ours, tmp_path / "out")
    hf = transformers.DeepseekV3ForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager").eval()
    assert rel_err(hf_logits(hf, ids), expected) <= 1e-4
    # the MTP layer is written the way DeepSeek lays it out, and comes back with load_hf
    keys = set(json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())["weight_map"])
    assert {"model.layers.3.eh_proj.weight", "model.layers.3.shared_head.head.weight",
            "model.layers.3.mlp.experts.7.down_proj.weight"} <= keys
    again = load_hf(tmp_path / "out", "cpu").eval()
    assert again.config.num_nextn_predict_layers == 1
    with torch.no_grad():
        logits, mtp = again.forward_with_mtp(ids)
    assert torch.equal(logits, expected) and torch.equal(mtp[0], expected_mtp[0])
    for name, tensor in ours.state_dict().items():
        assert torch.equal(tensor, again.state_dict()[name]), name


def _quantize_fp8(weight: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    rows, cols = weight.shape
    br, bc = -(-rows // block), -(-cols // block)
    scale = torch.empty(br, bc)
    q = torch.empty(rows, cols, dtype=torch.float8_e4m3fn)
    for i in range(br):
        for j in range(bc):
            tile = weight[i * block:(i + 1) * block, j * block:(j + 1) * block]
            s = tile.abs().max().clamp(min=1e-12) / 448.0
            scale[i, j] = s
            q[i * block:(i + 1) * block, j * block:(j + 1) * block] = (tile / s).to(torch.float8_e4m3fn)
    return q, scale


def test_fp8_checkpoint_loads_to_its_dequantized_weights(tmp_path, ids):
    hf = make_hf_model(q_lora_rank=24)
    hf.save_pretrained(tmp_path / "hf")
    block = 16  # smaller than DeepSeek's 128 so that the tiny weights span several (and partial) blocks
    tensors = load_file(tmp_path / "hf" / "model.safetensors")
    quantized, dequantized = {}, {}
    for name, w in tensors.items():
        if w.ndim == 2 and "proj" in name:  # DeepSeek quantizes the linear layers, not embeddings/head/router
            q, s = _quantize_fp8(w, block)
            quantized[name], quantized[name + "_scale_inv"] = q, s
            expand = torch.kron(s, torch.ones(block, block))[: w.shape[0], : w.shape[1]]
            dequantized[name] = q.float() * expand
        else:
            quantized[name] = w
    assert any(t.dtype == torch.float8_e4m3fn for t in quantized.values())
    fp8_dir = tmp_path / "fp8"
    fp8_dir.mkdir()
    save_file(quantized, fp8_dir / "model.safetensors")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                     "weight_block_size": [block, block]}
    (fp8_dir / "config.json").write_text(json.dumps(config))

    # the expectation: transformers running the dequantized weights, saved as a plain float32 checkpoint
    save_file({**tensors, **dequantized}, tmp_path / "hf" / "model.safetensors")
    reference = transformers.DeepseekV3ForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager")
    expected = hf_logits(reference.eval(), ids)
    assert rel_err(expected, hf_logits(hf, ids)) > 1e-3  # quantization did change the model
    ours = load_hf(fp8_dir, "cpu", dtype=torch.float32).eval()
    with torch.no_grad():
        assert rel_err(ours(ids), expected) <= 1e-4
    assert ours.layers[0].self_attn.q_a_proj.weight.dtype == torch.float32
