"""The DeepSeek-V3 model itself: sizes, HAL-only op use, losses, MTP, expert-bias balancing, configs."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from openseek_hal.backends.cpu import CPUBackend
from openseek_hal.errors import ConfigError
from openseek_hal.models import DeepseekV3Config, build_model, preset
from openseek_hal.ops.rope_scaling import rope_tables, softmax_scale

SMALL = dict(vocab_size=61, hidden_size=48, intermediate_size=64, moe_intermediate_size=24, num_hidden_layers=3,
             num_attention_heads=2, num_key_value_heads=2, n_routed_experts=8, num_experts_per_tok=2, n_group=2,
             topk_group=1, first_k_dense_replace=1, q_lora_rank=None, kv_lora_rank=16, qk_rope_head_dim=8,
             qk_nope_head_dim=8, v_head_dim=8, num_nextn_predict_layers=2, initializer_range=0.1,
             seq_aux_loss_coef=0.01)


def ids_for(vocab: int, batch: int = 2, seq: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


# -- sizes -------------------------------------------------------------------------------------------

def test_openseek_small_and_deepseek_v3_parameter_counts():
    small, v3 = preset("openseek-small"), preset("deepseek-v3")
    assert abs(small.num_parameters() / 1e9 - 1.39) < 0.01
    assert abs(small.num_parameters(active=True) / 1e9 - 0.40) < 0.01
    assert abs(v3.num_parameters() / 1e9 - 671) < 1
    assert abs(v3.num_parameters(active=True) / 1e9 - 37) < 1


@pytest.mark.parametrize("name,overrides", [("deepseek-v3", {}), ("openseek-small", {}),
                                            ("tiny", dict(q_lora_rank=32, attention_bias=True))])
def test_parameter_count_from_config_matches_the_built_model(name, overrides):
    model = build_model(name, "cpu", device="meta", **overrides)
    config = model.config
    total = sum(p.numel() for p in model.parameters())
    assert total == config.num_parameters(include_mtp=True)
    assert sum(p.numel() for n, p in model.named_parameters() if not n.startswith("mtp.")) == config.num_parameters()
    # active: a token touches top_k of each MoE layer's routed experts
    per_expert = 3 * config.hidden_size * config.moe_intermediate_size
    moe_layers = sum(config.is_moe_layer(i) for i in range(config.num_hidden_layers))
    inactive = moe_layers * (config.n_routed_experts - config.num_experts_per_tok) * per_expert
    assert config.num_parameters(active=True) == config.num_parameters() - inactive


@pytest.mark.parametrize("overrides", [dict(tie_word_embeddings=True), dict(mtp_loss_weight=0.0, q_lora_rank=16)])
def test_flops_per_token_counts_the_matmuls_of_a_training_step(overrides):
    from torch.utils.flop_counter import FlopCounterMode

    model = build_model(SMALL, "cpu", seed=0, **overrides).train()
    ids = ids_for(61, batch=2, seq=16)
    with FlopCounterMode(display=False) as counter:  # the reference attention is plain matmuls: all counted
        model.loss(ids, ids).total.backward()
    assert counter.get_total_flops() / ids.numel() == pytest.approx(model.flops_per_token(16), rel=1e-9)


def test_tiny_preset_is_small_and_takes_the_tokenizer_vocab():
    config = preset("tiny", vocab_size=5000)
    assert config.vocab_size == 5000
    assert 2e6 <= config.num_parameters(include_mtp=True) <= 6e6
    assert config.first_k_dense_replace == 1 and config.num_nextn_predict_layers == 1


# -- the HAL contract ---------------------------------------------------------------------------------

class CountingBackend(CPUBackend):
    """The reference backend, counting the calls of every op."""

    name = "counting"

    def __init__(self):
        super().__init__()
        self.calls: dict[str, int] = {}

    def native_ops(self):
        def counted(name, fn):
            def call(*args, **kwargs):
                self.calls[name] = self.calls.get(name, 0) + 1
                return fn(*args, **kwargs)
            return call
        return {name: counted(name, fn) for name, fn in super().native_ops().items()}


def test_model_runs_every_op_through_the_backend():
    backend = CountingBackend()
    model = build_model(SMALL, backend, seed=0, q_lora_rank=16).train()
    ids = ids_for(61)
    model.loss(ids, ids).total.backward()
    layers = SMALL["num_hidden_layers"] + SMALL["num_nextn_predict_layers"]
    assert backend.calls["causal_attention"] == layers
    assert backend.calls["mla_qkv"] == layers and "rope" not in backend.calls  # the rotations are inside mla_qkv
    assert backend.calls["moe_route"] == backend.calls["moe_permute"] == backend.calls["moe_unpermute"] == layers - 1
    assert backend.calls["grouped_linear"] == 2 * (layers - 1)  # gate/up and down of the routed experts
    # each block's post-attention norm, and the input norm of every block after the first (and the final norms),
    # which also add the previous block's residual branch
    assert backend.calls["add_rms_norm"] == 2 * layers
    # the head and its loss: one op per head pass (main and each MTP depth)
    assert backend.calls["linear_cross_entropy"] == 1 + SMALL["num_nextn_predict_layers"]
    assert "cross_entropy" not in backend.calls
    assert backend.calls["embedding"] == 1 + SMALL["num_nextn_predict_layers"]
    assert backend.calls["silu_and_mul"] > 0
    # the first block's and each MTP block's input norm, the query and key-value latents' norms in every
    # block, MTP's two input norms
    assert backend.calls["rms_norm"] == 1 + 2 * layers + 3 * SMALL["num_nextn_predict_layers"]


# -- forward, losses, MTP -------------------------------------------------------------------------------

def test_forward_and_losses_match_an_independent_computation(backend):
    model = build_model(SMALL, backend, seed=0).train()
    device = backend.device.torch_device
    ids = ids_for(61).to(device)
    labels = ids_for(61, seed=1).to(device)
    labels[0, 3] = -100
    out = model.loss(ids, labels)
    logits, mtp_logits = model.forward_with_mtp(ids)
    assert logits.shape == (2, 12, 61) and len(mtp_logits) == 2
    assert torch.allclose(model(ids), logits, atol=1e-5)
    main = F.cross_entropy(logits.reshape(-1, 61), labels.reshape(-1), ignore_index=-100)
    assert torch.allclose(out.main, main, atol=1e-5)
    # depth d at position i predicts labels[i + d]; the last d positions have no target
    mtp = [F.cross_entropy(m[:, : 12 - d].reshape(-1, 61), labels[:, d:].reshape(-1), ignore_index=-100)
           for d, m in enumerate(mtp_logits, start=1)]
    assert torch.allclose(out.mtp, torch.stack(mtp).mean(), atol=1e-5)
    assert out.aux is not None and out.aux > 0
    assert torch.allclose(out.total, out.main + 0.3 * out.mtp + out.aux)
    out.total.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing


@pytest.mark.parametrize("tied", [True, False])
def test_loss_gradients_match_plain_autograd_of_the_logits(tied):
    """`loss` collects the shared embedding / head weight's gradient itself (no dense embedding gradient,
    no add of two tables) and the blocks leave their residual add to the next norm: every parameter's
    gradient equals autograd's through `forward_with_mtp`'s logits, in float64 (repeated tokens included)."""
    model = build_model(SMALL, "cpu", seed=0, dtype=torch.float64, tie_word_embeddings=tied,
                        seq_aux_loss_coef=0.0).train()
    ids, labels = ids_for(61, seq=40), ids_for(61, seq=40, seed=1)  # 80 tokens of 61: tokens repeat
    labels[1, 5] = -100
    model.loss(ids, labels).total.backward()
    collected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    logits, mtp_logits = model.forward_with_mtp(ids)
    main = F.cross_entropy(logits.reshape(-1, 61), labels.reshape(-1))
    mtp = torch.stack([F.cross_entropy(m[:, : 40 - d].reshape(-1, 61), labels[:, d:].reshape(-1))
                       for d, m in enumerate(mtp_logits, start=1)]).mean()
    (main + 0.3 * mtp).backward()
    for name, p in model.named_parameters():
        assert torch.allclose(collected[name], p.grad, rtol=1e-9, atol=1e-12 * p.grad.abs().max().item()), name


def test_mtp_is_causal_and_uses_the_shifted_future_token():
    model = build_model(SMALL, "cpu", seed=0).eval()
    ids = ids_for(61)
    with torch.no_grad():
        logits, (d1, d2) = model.forward_with_mtp(ids)
        changed = ids.clone()
        changed[:, 7] = (changed[:, 7] + 1) % 61
        logits2, (e1, e2) = model.forward_with_mtp(changed)
    # equal up to rounding: the expert groups (so the matmul shapes) change with the tokens
    same = lambda a, b: torch.allclose(a, b, atol=1e-5)  # noqa: E731
    assert same(logits[:, :7], logits2[:, :7]) and not same(logits[:, 7], logits2[:, 7])
    # depth 1 at position i reads token i + 1; depth 2 reads tokens i + 1 and i + 2
    assert same(d1[:, :6], e1[:, :6]) and not same(d1[:, 6], e1[:, 6])
    assert same(d2[:, :5], e2[:, :5]) and not same(d2[:, 5], e2[:, 5])


def test_mtp_off_and_no_aux_at_depth_zero():
    model = build_model(SMALL, "cpu", seed=0, num_nextn_predict_layers=0, seq_aux_loss_coef=0.0).train()
    ids = ids_for(61)
    out = model.loss(ids, ids)
    assert out.mtp is None and out.aux is None and torch.equal(out.total, out.main)


def test_sequence_aux_loss_matches_the_deepseek_formula():
    model = build_model(SMALL, "cpu", seed=0, num_nextn_predict_layers=0, num_hidden_layers=2).train()
    moe = model.layers[1].mlp
    captured = {}
    moe.gate.register_forward_hook(lambda mod, inp, out: captured.update(logits=out.detach()))
    route = moe._route
    moe._route = lambda *a, **k: captured.setdefault("route", route(*a, **k))
    ids = ids_for(61, batch=3, seq=10)
    aux = model.loss(ids, ids).aux
    scores = captured["logits"].sigmoid().view(3, 10, 8)
    indices = captured["route"][0].view(3, 10, 2)
    expected = 0.0
    for b in range(3):  # L = alpha * sum_i f_i P_i, f_i = E / (k T) * #picks of i, P_i = mean_t s'_{i,t}
        f = torch.tensor([(indices[b] == i).sum().item() for i in range(8)]) * 8 / (2 * 10)
        p = (scores[b] / scores[b].sum(-1, keepdim=True)).mean(0)
        expected += 0.01 * (f * p).sum().item() / 3
    assert math.isclose(aux.item(), expected, rel_tol=1e-5)


def test_training_reduces_the_loss():
    torch.manual_seed(0)
    model = build_model("tiny", "cpu", seed=0, vocab_size=64).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = ids_for(64, batch=2, seq=16)
    first = None
    for _ in range(8):
        loss = model.loss(ids[:, :-1], ids[:, 1:]).total
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
        model.update_expert_bias()
    assert loss.item() < 0.7 * first


# -- aux-loss-free balancing ---------------------------------------------------------------------------

class SumOverTwoRanks:
    """A stand-in Communicator: the other rank routed ``other`` tokens to each expert."""

    def __init__(self, other: torch.Tensor):
        self.other, self.calls = other, 0

    def all_reduce(self, tensor, op="sum", async_op=False):
        self.calls += 1
        tensor += self.other


@pytest.mark.parametrize("with_comm", [False, True])
def test_expert_bias_update(with_comm):
    model = build_model(SMALL, "cpu", seed=0, bias_update_rate=0.01).train()
    ids = ids_for(61)
    model(ids)
    moes = list(model.moe_layers())
    assert len(moes) == 4  # two main MoE layers and the two MTP blocks, which forward() does not run
    loads = torch.stack([m.expert_load.clone() for m in moes])
    assert loads.sum(1).tolist() == [2 * 12 * 2] * 2 + [0, 0]
    other = torch.arange(32, dtype=torch.float32).view(4, 8)
    comm = SumOverTwoRanks(other) if with_comm else None
    before = torch.stack([m.gate.e_score_correction_bias.clone() for m in moes])
    model.update_expert_bias(comm)
    total = loads + other if with_comm else loads
    expected = before + 0.01 * torch.sign(total.mean(1, keepdim=True) - total)
    assert torch.equal(torch.stack([m.gate.e_score_correction_bias for m in moes]), expected)
    assert all(m.expert_load.sum() == 0 for m in moes)
    assert comm is None or comm.calls == 1
    model.eval()
    model(ids)
    assert all(m.expert_load.sum() == 0 for m in moes)  # inference does not count


def test_routing_bias_stays_float32_in_a_bfloat16_model():
    model = build_model(SMALL, "cpu", seed=0, dtype=torch.bfloat16)
    moe = next(model.moe_layers())
    assert moe.gate.weight.dtype == torch.bfloat16
    assert moe.gate.e_score_correction_bias.dtype == torch.float32 and moe.expert_load.dtype == torch.float32
    assert model(ids_for(61)).dtype == torch.bfloat16


# -- rope tables -----------------------------------------------------------------------------------------

def test_rope_tables_plain_and_yarn_softmax_scale():
    cos, sin = rope_tables(16, 10)
    angles = torch.arange(10.0)[:, None] * 10000.0 ** (-torch.arange(0, 16, 2) / 16)  # plain rope, by hand
    assert torch.allclose(cos, angles.cos()) and torch.allclose(sin, angles.sin())
    yarn = {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "mscale": 1.0,
            "mscale_all_dim": 1.0}
    assert math.isclose(softmax_scale(192, yarn), 192 ** -0.5 * (0.1 * math.log(40) + 1) ** 2)
    assert softmax_scale(192, None) == 192 ** -0.5
    # the fastest frequency is kept and the slowest is interpolated by the factor
    cos_y, sin_y = rope_tables(64, 2, rope_scaling=yarn)
    angle = torch.atan2(sin_y[1], cos_y[1])
    assert math.isclose(angle[0].item(), 1.0, rel_tol=1e-6)
    assert math.isclose(angle[-1].item(), 10000 ** (-62 / 64) / 40, rel_tol=1e-6)


# -- configs --------------------------------------------------------------------------------------------

def test_config_loading_and_errors(tmp_path):
    path = tmp_path / "m.yaml"
    path.write_text("hidden_size: 64\nnum_attention_heads: 2\nnum_key_value_heads: 2\n")
    config = DeepseekV3Config.from_yaml(path, vocab_size=10)
    assert (config.hidden_size, config.vocab_size) == (64, 10)
    assert DeepseekV3Config.from_dict(config.to_dict()) == config
    with pytest.raises(ConfigError, match="hiden_size"):
        DeepseekV3Config.from_dict({"hiden_size": 3})
    with pytest.raises(ConfigError, match="n_group"):
        DeepseekV3Config(n_routed_experts=10, n_group=3)
    with pytest.raises(ConfigError, match="not found"):
        DeepseekV3Config.from_yaml(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="unknown model preset"):
        preset("huge")
    # transformers 5 writes rope_parameters; 4.x (and DeepSeek) rope_scaling + rope_theta
    hf5 = DeepseekV3Config.from_hf({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 5e4,
                                                        "original_max_position_embeddings": 64},
                                    "transformers_version": "5.0", "model_type": "deepseek_v3"})
    assert hf5.rope_theta == 5e4 and hf5.rope_scaling["factor"] == 4.0
    assert DeepseekV3Config.from_hf(hf5.to_hf()) == hf5


def test_training_step_reads_nothing_back_to_the_host():
    """A bf16 forward and backward of the model on ``triton-interpret`` (the Triton kernels and wrappers
    the ``cuda`` backend runs) reads no device value on the host: on a GPU each read would stall the host,
    and under ``compile: true`` it breaks the block's graph (a `Tensor.item()` in the norm wrapper did both:
    its resumed frame handed Triton a symbolic ``num_warps``). The recorder is not blind: the old wrapper
    is caught."""
    import sys
    from unittest.mock import patch

    from host_reads import HostReads

    from openseek_hal.conformance.expert_parallel import tiny_overrides

    model = build_model("tiny", "triton-interpret", dtype=torch.bfloat16, seed=0, **tiny_overrides())
    model.train()
    gen = torch.Generator().manual_seed(0)
    ids, labels = (torch.randint(0, model.config.vocab_size, (2, 16), generator=gen) for _ in range(2))
    with HostReads() as reads:
        model.loss(ids, labels).total.backward()
    assert reads.seen == []
    norm = sys.modules[model.norm._rms_norm.__module__]  # the backend's (interpreted) copy of the kernels
    with patch.object(norm, "split_float", lambda x: (float(torch.tensor(x, dtype=torch.float32)), 0.0)), \
            HostReads() as reads:
        model.loss(ids, labels)
    assert "aten._local_scalar_dense.default" in reads.seen


def test_bf16_router_logits_on_tensor_cores_match_the_fp32_router(monkeypatch):
    """The CUDA path of the router (bf16 products into an fp32 accumulator, the fp32 upstream gradient split
    into two bf16 terms) against the fp32 router: logits to fp32 summation order (emulated here by float64
    products rounded once to fp32), gradients within one bf16 rounding of the float64 truth."""
    from openseek_hal.models.deepseek_v3 import model as m

    monkeypatch.setattr(m, "_mm_fp32", lambda a, b: (a.double() @ b.double()).float())
    monkeypatch.setattr(m, "_tensor_core_logits", lambda x, w: True)
    gen = torch.Generator().manual_seed(0)
    hidden, experts, tokens = 96, 16, 40
    router = m.Router(m.DeepseekV3Config(hidden_size=hidden, n_routed_experts=experts)).to(torch.bfloat16)
    with torch.no_grad():
        router.weight.copy_(torch.randn(experts, hidden, generator=gen) * 0.05)
    x = torch.randn(tokens, hidden, generator=gen).to(torch.bfloat16).requires_grad_()
    upstream = torch.randn(tokens, experts, generator=gen) * torch.logspace(-6, 2, experts)  # fp32, 8 decades
    logits = router(x)
    assert logits.dtype == torch.float32
    logits.backward(upstream)
    x64, w64 = x.detach().double().requires_grad_(), router.weight.detach().double().requires_grad_()
    exact = x64 @ w64.t()
    exact.backward(upstream.double())
    # fp32 sums of `hidden` exact products: within hidden * 2**-24 of the sum of magnitudes
    bound = hidden * 2.0**-24 * (x64.abs() @ w64.abs().t())
    assert ((logits.double() - exact).abs() <= bound).all()
    up = upstream.double().abs()
    for got, truth, magnitudes in ((x.grad, x64.grad, up @ w64.abs()),
                                   (router.weight.grad, w64.grad, up.t() @ x64.abs())):
        assert got.dtype == torch.bfloat16
        # the final bf16 rounding (2**-8 of the value), plus the split (2**-16) and the fp32 sums
        # (<= 40 * 2**-24) of the sum of the terms' magnitudes
        assert ((got.double() - truth).abs() <= 2.0**-8 * truth.abs() + 2.0**-15 * magnitudes).all()


def test_router_takes_the_fp32_path_where_torch_has_no_fp32_output_matmul(monkeypatch):
    """The tensor-core router is tried once per device; a torch whose ``mm`` refuses ``out_dtype`` keeps the
    fp32 router (the CUDA path's one precondition that can fail at run time)."""
    from openseek_hal.models.deepseek_v3 import model as m

    monkeypatch.setattr(m, "_FP32_OUT_MM", {})

    def refused(a, b):
        raise NotImplementedError("Could not run 'aten::mm.dtype' with arguments from the 'CPU' backend")

    monkeypatch.setattr(m, "_mm_fp32", refused)
    assert m._fp32_out_mm(torch.device("cpu")) is False
    calls = []
    monkeypatch.setattr(m, "_mm_fp32", lambda a, b: calls.append(1) or (a.double() @ b.double()).float())
    m._FP32_OUT_MM.clear()
    assert m._fp32_out_mm(torch.device("cpu")) and m._fp32_out_mm(torch.device("cpu")) and len(calls) == 1


def test_tied_gradient_refuses_a_use_that_arrives_after_collection():
    from openseek_hal.models.deepseek_v3.tied import TiedGradient

    weight = torch.randn(7, 4, dtype=torch.float64, requires_grad=True)
    tied = TiedGradient(weight)
    ids = torch.tensor([1, 3, 1])
    tied.lookup(F.embedding, ids).sum().backward()  # the first lookup collects: rows 1 (twice) and 3
    assert torch.equal(weight.grad, F.one_hot(ids, 7).double().sum(0)[:, None].expand(7, 4))
    late = F.linear(torch.ones(2, 4, dtype=torch.float64), tied.head_weight()).sum()
    with pytest.raises(RuntimeError, match="after its gradient was returned"):
        late.backward()


@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_tied_rows_add_in_float32_once_per_row(impl):
    """The lookups' rows go into a bfloat16 gradient as float32 sums rounded once (not one bf16 rounding per
    repeated token), and a float32 gradient gets the float32 sums: the reference (the CPU's) and the Triton
    kernel (sorted runs, one program per id) alike; the kernel updates the table in place."""
    from openseek_hal.ops.embedding import embedding_add_rows
    from openseek_hal.ops.kernel_loader import load_kernels

    add_rows = embedding_add_rows if impl == "reference" else load_kernels(True).KERNELS["embedding_add_rows"]
    gen = torch.Generator().manual_seed(4)
    ids = torch.tensor([2, 0, 2, 2, 5, 2, 0])
    rows = torch.randn(7, 6, generator=gen).to(torch.bfloat16)
    start = torch.randn(8, 6, generator=gen).to(torch.bfloat16)
    # float32 holds these sums of bf16 numbers exactly, so one rounding of them is the exact sum's rounding
    exact = start.double().index_add(0, ids, rows.double())
    assert torch.equal(add_rows(start.float(), ids, rows), exact.float())
    table = start.clone()
    got = add_rows(table, ids, rows)
    assert impl == "reference" or got.data_ptr() == table.data_ptr()
    if impl == "reference":
        assert torch.equal(got, exact.float().to(torch.bfloat16))  # round to nearest, once
    else:  # Triton's interpreter converts float32 to bf16 by truncation (the GPU rounds to nearest): one
        # rounding either way, so every element is the exact sum's upper or lower bf16 neighbour
        ulp = torch.finfo(torch.bfloat16).eps * exact.abs().clamp_min(2**-126)
        assert ((got.double() - exact).abs() < ulp).all()


def test_tied_rows_kernel_sums_long_runs_the_same_way_every_call():
    """Runs of one id longer than the kernel's block of rows (hundreds of copies of a frequent token), ids in
    random order, a width of several column blocks: the table matches the float64 sum within float32's
    rounding of a run's sum (``n * eps * sum|rows|`` per element), and two calls give the same bits."""
    from openseek_hal.ops.kernel_loader import load_kernels

    add_rows = load_kernels(True).KERNELS["embedding_add_rows"]
    gen = torch.Generator().manual_seed(5)
    # a Zipf-like draw: id 0 about half the tokens, the rest spread over 40 ids
    ids = torch.where(torch.rand(300, generator=gen) < 0.5, 0, torch.randint(1, 41, (300,), generator=gen))
    rows = torch.randn(300, 600, generator=gen)
    start = torch.randn(50, 600, generator=gen)
    want = start.double().index_add(0, ids, rows.double())
    bound = (300 + 1) * torch.finfo(torch.float32).eps / 2 * (
        start.double().abs().index_add(0, ids, rows.double().abs()))
    first = add_rows(start.clone(), ids, rows)
    assert ((first.double() - want).abs() <= bound).all()
    assert torch.equal(first, add_rows(start.clone(), ids, rows))
    assert torch.equal(first[41:], start[41:])  # rows no id names are left as they were


@pytest.mark.parametrize("interpret", [None, True])
def test_balance_loss_rejects_a_batch_that_does_not_split(interpret):
    """The reference and the Triton kernel refuse tokens that are not ``batch`` equal sequences, and an unknown
    score function, with one ValueError."""
    from openseek_hal import ops
    from openseek_hal.ops.kernel_loader import load_kernels

    fn = ops.get("moe_seq_aux_loss").reference if interpret is None else load_kernels(True).KERNELS["moe_seq_aux_loss"]
    logits, picks = torch.randn(7, 4), torch.zeros(7, 1, dtype=torch.int64)
    with pytest.raises(ValueError, match="7 tokens are not 2 sequences"):
        fn(logits, picks, 2, coef=1.0)
    with pytest.raises(ValueError, match="score_func"):
        fn(logits, picks, 7, coef=1.0, score_func="relu")


class _Dispatched(TorchDispatchMode):
    """The names of the aten operators dispatched while active (``add``, ``zeros_like``, ``addmm``, ...)."""

    def __init__(self):
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def test_backward_fills_no_zero_gradients_for_non_differentiable_outputs():
    """The kernels' autograd nodes (attention's log-sum-exp, the router's indices and counts, the permute's order
    and counts, the balance loss's f) ask autograd not to materialize the gradients their unused outputs never
    get: the backward of a whole model makes no zero-filled tensor (each was a kernel launch on a GPU)."""
    model = build_model("tiny", "triton-interpret", seed=0, vocab_size=64).train()
    ids = ids_for(64, batch=2, seq=16)
    loss = model.loss(ids[:, :-1], ids[:, 1:]).total
    with _Dispatched() as seen:
        loss.backward()
    assert not {"zeros", "zeros_like", "zero_", "new_zeros"} & set(seen.names)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_shared_experts_add_the_routed_output_in_their_last_gemm(dtype):
    """``MLP(x, add)`` is ``add + MLP(x)`` made by the down projection's GEMM (``addmm``, no add kernel): within
    one rounding of the float64 sum of the two, and no separate ``add`` dispatched. The fallback (a layer
    that is not a plain linear one) gives the same value by an add."""
    from openseek_hal.models.deepseek_v3.model import MLP

    torch.manual_seed(0)
    mlp = MLP(32, 16, CPUBackend()).to(dtype)
    x, add = torch.randn(2, 5, 32).to(dtype), torch.randn(10, 32).to(dtype)
    with torch.no_grad():
        with _Dispatched() as seen:
            got = mlp(x, add)
        assert "addmm" in seen.names and not {"add", "add_"} & set(seen.names)
        h = mlp._silu_and_mul(mlp.gate_up_proj(x)).double().reshape(10, 16)
        exact = add.double() + h @ mlp.down_proj.weight.double().t()
        eps = torch.finfo(dtype).eps
        # one rounding of the sum, plus float32 accumulation over 16 products (bf16 products are exact in it)
        bound = eps * exact.abs() + 16 * torch.finfo(torch.float32).eps * (
            add.double().abs() + h.abs() @ mlp.down_proj.weight.double().abs().t())
        assert got.shape == (10, 32) and ((got.double() - exact).abs() <= bound).all()
        mlp.down_proj = torch.nn.Sequential(mlp.down_proj)  # not a plain linear layer: the add path
        fallback = mlp(x, add)
        assert ((fallback.double() - exact).abs() <= 2 * bound + eps * exact.abs()).all()


def test_mla_input_projections_share_one_input_gradient_gemm():
    """MLA's query and key-value projections of one input: the same values and gradients as two linear layers
    (float64 gradcheck), and in backward the input's gradient is one ``addmm`` (no separate add kernel)."""
    from openseek_hal.models.deepseek_v3.model import _two_linears, _TwoLinears

    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 8, dtype=torch.float64, generator=gen, requires_grad=True)
    w1 = torch.randn(5, 8, dtype=torch.float64, generator=gen, requires_grad=True)
    w2 = torch.randn(7, 8, dtype=torch.float64, generator=gen, requires_grad=True)
    assert torch.autograd.gradcheck(_TwoLinears.apply, (x, w1, w2))
    a, b = torch.nn.Linear(8, 5, bias=False).double(), torch.nn.Linear(8, 7, bias=False).double()
    y1, y2 = _two_linears(x, a, b)
    assert torch.equal(y1, F.linear(x, a.weight)) and torch.equal(y2, F.linear(x, b.weight))
    loss = y1.square().sum() + y2.sum()
    with _Dispatched() as seen:
        loss.backward()
    assert "addmm" in seen.names and not {"add", "add_"} & set(seen.names)
    b.bias = torch.nn.Parameter(torch.zeros(7, dtype=torch.float64))  # a bias: the layers' own calls
    y1, y2 = _two_linears(x, a, b)
    assert "TwoLinears" not in y1.grad_fn.name() and torch.equal(y2, F.linear(x, b.weight, b.bias))


def test_router_and_shared_experts_share_one_input_gradient(monkeypatch):
    """On the tensor-core router path (emulated: float64 products rounded to fp32) the router and the shared
    experts' gate/up projection run as one autograd node: the same forward bits as the separate layers, the
    same weight gradients, the input gradient within one bf16 rounding, and one tokens x hidden gradient add
    fewer in backward (the router's product accumulates the other's in one ``addmm``)."""
    from openseek_hal.models.deepseek_v3 import model as m

    monkeypatch.setattr(m, "_mm_fp32", lambda a, b: (a.double() @ b.double()).float())
    monkeypatch.setattr(m, "_tensor_core_logits", lambda x, w: True)
    moe = build_model(SMALL, "cpu", seed=0, dtype=torch.bfloat16).train().layers[1].mlp
    assert moe.shared_experts is not None
    gen = torch.Generator().manual_seed(1)
    x0 = torch.randn(2, 12, SMALL["hidden_size"], generator=gen).to(torch.bfloat16)
    upstream = torch.randn(2, 12, SMALL["hidden_size"], generator=gen).to(torch.bfloat16)

    class Separate:  # the same two products as separate autograd nodes: the router's and a linear layer's
        @staticmethod
        def apply(x, weight, other):
            return m._BF16RouterLogits.apply(x, weight), F.linear(x, other)

    def run(fused: bool):
        monkeypatch.setattr(m, "_RouterLogitsAndLinear", real if fused else Separate)
        moe.zero_grad()
        x = x0.clone().requires_grad_()
        out, _ = moe(x)
        with _Dispatched() as seen:
            out.backward(upstream)
        adds = sum(1 for name in seen.names if name in ("add", "add_"))
        return out.detach(), x.grad, {n: p.grad.clone() for n, p in moe.named_parameters()}, adds

    real = m._RouterLogitsAndLinear
    out, dx, grads, adds = run(True)
    out_ref, dx_ref, grads_ref, adds_ref = run(False)
    assert torch.equal(out, out_ref)
    assert grads.keys() == grads_ref.keys() and all(torch.equal(grads[n], grads_ref[n]) for n in grads)
    torch.testing.assert_close(dx.float(), dx_ref.float(), rtol=2**-7, atol=2**-7 * dx_ref.abs().max().item())
    assert adds == adds_ref - 1 and adds_ref >= 2, (adds, adds_ref)
