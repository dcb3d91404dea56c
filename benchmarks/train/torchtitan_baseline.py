"""Baseline throughput: torchtitan 0.2.2's DeepSeek-V3 model at openseek-small's dimensions in a plain training loop.

    python benchmarks/train/torchtitan_baseline.py --steps 20 --warmup 3 --micro-batch 2 --seq-len 4096 --mtp 0 \\
        --json OUT.json
    python benchmarks/train/torchtitan_baseline.py --device cpu --tiny      # CPU smoke test (tiny dims, no compile)

What runs (one device, no parallelism, no activation checkpointing):

* the model is torchtitan's own ``DeepSeekV3Model`` / ``DeepSeekV3ModelArgs`` (MLA, dense first layer, MoE
  with shared experts, torchtitan's token-choice router, grouped GEMM experts through ``torch._grouped_mm`` on
  SM90+), its dimensions read from our preset (``openseek-small``; ``--tiny``: our ``tiny`` preset);
* ``torch.compile`` is applied per transformer block by torchtitan's own ``apply_compile`` (the function its
  DeepSeek-V3 ``parallelize`` calls), and the loss is compiled as torchtitan does (compile components
  "model" and "loss");
* loss: torchtitan's ``cross_entropy_loss`` (sum) divided by the tokens of the step, on random tokens
  (labels are the inputs shifted by one);
* optimizer: ``torch.optim.AdamW(fused=True)`` over every parameter, a global grad-norm clip (torchtitan's
  and our trainer's default 1.0), and torchtitan's aux-loss-free expert-bias update as an optimizer
  step pre-hook (copied from ``build_optimizers_with_moe_load_balancing``, single-device branch);
* precision (``--precision``): ``bf16`` (default) = bf16 parameters, gradients and AdamW moments, the routing
  buffers (expert bias, token counts) kept fp32; ``autocast`` = fp32 parameters + ``torch.autocast(bf16)``,
  which is what torchtitan itself does on a single device (``maybe_enable_amp``).

Only torchtitan's model modules are imported (not ``torchtitan.models.deepseek_v3``'s package ``__init__``,
which pulls datasets/torchdata/tokenizer code); if ``torchtitan.protocols.train_spec`` (a registry the model
module imports only for the ``ModelProtocol`` name) cannot be imported for want of those packages, a
one-name stand-in re-exporting the real ``torchtitan.protocols.model.ModelProtocol`` is used; the JSON says so.

Timing: ``--warmup`` steps (compilation included), then ``--steps`` timed steps between two
``torch.cuda.synchronize()``; tokens/s = steps x micro-batch x seq-len / elapsed. MFU = tokens/s x
FLOPs-per-token / 989e12, FLOPs-per-token from our own ``DeepseekV3.flops_per_token`` (the trainer's formula),
on our model built on the meta device with the same config (MTP depth = what ran: 0).
Writes ``--json`` (card, versions, commit, command, config, checks, results) and prints a table last.
Exit status: 0 ok, 1 the run failed (the JSON still says where), 2 bad arguments, 3 torchtitan not importable.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import platform
import shlex
import sys
import time
import traceback
import types
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PEAK_FLOPS = 989e12  # H100/H200 SXM dense bf16, the figure our trainer's MFU uses
EXPECTED_TORCHTITAN = "0.2.2"
INSTALL_HINT = ("install the staged wheels first: python3 -m pip install -q --no-index --no-deps --no-compile "
                "--target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site")


def log(msg: str) -> None:
    print(f"[torchtitan_baseline] {msg}", flush=True)


# -- imports ----------------------------------------------------------------------------------------------------
def import_torchtitan() -> types.SimpleNamespace:
    """torchtitan's DeepSeek-V3 model, MoE, compile and loss pieces, without its data/tokenizer/trainer modules."""
    try:
        import torchtitan
        import torchtitan.models
    except Exception as e:  # noqa: BLE001 - any failure here means "cannot use torchtitan"
        print(f"torchtitan_baseline: error: cannot import torchtitan ({type(e).__name__}: {e}); {INSTALL_HINT}",
              file=sys.stderr)
        sys.exit(3)
    shims = []
    try:
        base = os.path.dirname(torchtitan.models.__file__)
        # Package stand-ins for the model folders: their __init__ files import the training recipe
        # (datasets, tokenizers, dataloaders); we need only model/ and infra/ below them.
        for name in ("deepseek_v3", "llama3", "llama4"):
            full = f"torchtitan.models.{name}"
            if full not in sys.modules:
                pkg = types.ModuleType(full)
                pkg.__path__ = [os.path.join(base, name)]
                pkg.__package__ = full
                sys.modules[full] = pkg
        try:
            import torchtitan.protocols.train_spec  # noqa: F401
        except Exception as e:  # noqa: BLE001 - ImportError for want of torchdata/datasets, or anything they raise
            from torchtitan.protocols.model import ModelProtocol

            stand_in = types.ModuleType("torchtitan.protocols.train_spec")
            stand_in.ModelProtocol = ModelProtocol
            sys.modules["torchtitan.protocols.train_spec"] = stand_in
            shims.append(f"torchtitan.protocols.train_spec -> ModelProtocol only ({type(e).__name__}: {e})")
        from torchtitan.components.loss import cross_entropy_loss
        from torchtitan.config.job_config import Compile as CompileConfig
        from torchtitan.models.deepseek_v3.model.args import DeepSeekV3ModelArgs
        from torchtitan.models.deepseek_v3.model.model import DeepSeekV3Model
        from torchtitan.models.llama4.infra.parallelize import apply_compile
        from torchtitan.models.moe import MoEArgs
        from torchtitan.models.moe import moe as moe_module
    except Exception as e:  # noqa: BLE001
        traceback.print_exc()
        print(f"torchtitan_baseline: error: torchtitan is installed but its DeepSeek-V3 model modules do not import "
              f"({type(e).__name__}: {e}); a missing dependency needs its wheel in .whl/. {INSTALL_HINT}",
              file=sys.stderr)
        sys.exit(3)
    return types.SimpleNamespace(
        version=getattr(torchtitan, "__version__", "unknown"), path=os.path.dirname(torchtitan.__file__),
        DeepSeekV3ModelArgs=DeepSeekV3ModelArgs, DeepSeekV3Model=DeepSeekV3Model, MoEArgs=MoEArgs,
        moe_module=moe_module, apply_compile=apply_compile, CompileConfig=CompileConfig,
        cross_entropy_loss=cross_entropy_loss, shims=shims)


def import_openseek():
    sys.path.insert(0, str(REPO))
    try:
        from openseek_hal.models.deepseek_v3 import build_model, preset
    except Exception as e:  # noqa: BLE001
        print(f"torchtitan_baseline: error: cannot import openseek_hal from {REPO} ({type(e).__name__}: {e}); "
              "run from the repository root", file=sys.stderr)
        sys.exit(2)
    return build_model, preset


# -- environment ----------------------------------------------------------------------------------------------
def environment(torch, tt) -> dict:
    env = {"python": platform.python_version(), "torch": torch.__version__, "torchtitan": tt.version,
           "torchtitan_path": tt.path, "argv": sys.argv, "command": shlex.join([sys.executable, *sys.argv]),
           "host": platform.node(), "cwd": os.getcwd()}
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if torch.cuda.is_available():
        env["card"] = torch.cuda.get_device_name(0)
        env["cuda"] = torch.version.cuda
        env["capability"] = list(torch.cuda.get_device_capability(0))
        env["gpus_visible"] = torch.cuda.device_count()
    else:
        env["card"] = f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    from openseek_hal.provenance import git_state

    env.update(git_state(REPO))
    return env


# -- model ------------------------------------------------------------------------------------------------------
def titan_args(tt, cfg, seq_len: int, grouped_mm: bool, attn: str):
    """torchtitan's DeepSeekV3ModelArgs with the dimensions and routing of our config ``cfg``."""
    grouped = cfg.n_group > 1
    moe = tt.MoEArgs(
        num_experts=cfg.n_routed_experts, num_shared_experts=cfg.n_shared_experts,
        score_func=cfg.scoring_func, route_norm=cfg.norm_topk_prob, route_scale=cfg.routed_scaling_factor,
        gate_bias=False, score_before_experts=False,  # DeepSeek-V3: weights applied to the experts' outputs
        top_k=cfg.num_experts_per_tok,
        num_expert_groups=cfg.n_group if grouped else None, num_limited_groups=cfg.topk_group if grouped else None,
        use_grouped_mm=grouped_mm, load_balance_coeff=cfg.bias_update_rate)
    args = tt.DeepSeekV3ModelArgs(
        max_seq_len=seq_len, vocab_size=cfg.vocab_size, dim=cfg.hidden_size, inter_dim=cfg.intermediate_size,
        moe_inter_dim=cfg.moe_intermediate_size, n_layers=cfg.num_hidden_layers,
        n_dense_layers=cfg.first_k_dense_replace, n_heads=cfg.num_attention_heads, norm_eps=cfg.rms_norm_eps,
        moe_args=moe, q_lora_rank=cfg.q_lora_rank or 0, kv_lora_rank=cfg.kv_lora_rank,
        qk_nope_head_dim=cfg.qk_nope_head_dim, qk_rope_head_dim=cfg.qk_rope_head_dim, v_head_dim=cfg.v_head_dim,
        attn_type=attn, attn_mask_type="causal",
        # our preset has no rope scaling: keep seq_len <= original_seq_len so that torchtitan applies no YaRN
        original_seq_len=max(seq_len, cfg.max_position_embeddings), rope_theta=cfg.rope_theta)
    args.moe_impl = "standard"  # set by update_from_config in torchtitan's trainer (no DeepEP here)
    return args


def build_titan_model(torch, tt, args, device, precision: str, tie: bool):
    with torch.device("meta"):
        model = tt.DeepSeekV3Model(args)
    model = model.to_empty(device=device)
    with torch.no_grad():
        model.init_weights(buffer_device=device)  # torchtitan's init, in fp32
        if tie:  # not a torchtitan feature: share the output head's weight with the embedding
            model.tok_embeddings.weight = model.output.weight
    if precision == "bf16":
        # Parameters only (as FSDP's param_dtype does): Module.to(bfloat16) would also turn the complex RoPE
        # table into a real one and the routing buffers (expert bias, token counts) into bf16.
        with torch.no_grad():
            for p in model.parameters():
                p.data = p.data.to(torch.bfloat16)
    model.train()
    return model


def moe_blocks(model):
    return [b for b in model.layers.values() if getattr(b, "moe_enabled", False)]


def expert_bias_hook(torch, model):
    """torchtitan's `_update_expert_bias` (components/optimizer.py), single-device branch."""
    blocks = moe_blocks(model)

    def hook(*_args, **_kwargs):
        if not blocks or blocks[0].moe.load_balance_coeff is None:
            return
        counts = torch.vstack([b.moe.tokens_per_expert for b in blocks])
        with torch.no_grad():
            for i, b in enumerate(blocks):
                moe = b.moe
                tokens = counts[i].float()
                delta = moe.load_balance_coeff * torch.sign(tokens.mean() - tokens)
                delta = delta - delta.mean()
                moe.expert_bias.add_(delta)
                moe.tokens_per_expert.zero_()

    return hook


def probe_sdpa(torch, batch: int, seq: int, heads: int, qk_dim: int, v_dim: int, device) -> dict:
    """Which SDPA backends run MLA's shapes (q/k head dim != v head dim), forward and backward, in bf16.

    torchtitan's SDPA wrapper asks for [cuDNN, flash, math] in that priority; the first that runs is used."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    out = {}
    q = torch.randn(batch, heads, seq, qk_dim, device=device, dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(batch, heads, seq, qk_dim, device=device, dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(batch, heads, seq, v_dim, device=device, dtype=torch.bfloat16, requires_grad=True)
    for name in ("CUDNN_ATTENTION", "FLASH_ATTENTION", "EFFICIENT_ATTENTION", "MATH"):
        try:
            with sdpa_kernel([getattr(SDPBackend, name)]):
                F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=qk_dim ** -0.5).sum().backward()
            torch.cuda.synchronize()
            out[name] = "ok"
        except Exception as e:  # noqa: BLE001
            out[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
    out["torchtitan_uses"] = next((n for n in ("CUDNN_ATTENTION", "FLASH_ATTENTION", "MATH") if out[n] == "ok"),
                                  None)
    return out


def differences(args, cfg) -> list[str]:
    """What this baseline does differently from our trainer on the same preset (for the reader of the JSON)."""
    out = []
    if args.mtp:
        out.append(f"no MTP: torchtitan 0.2.2's DeepSeek-V3 has none (MTP depth {args.mtp} requested)")
    if not args.tie_embeddings:
        out.append("untied embedding and output head (torchtitan's DeepSeek-V3 has no weight tying; "
                   f"+{cfg.vocab_size * cfg.hidden_size / 1e6:.1f}M parameters, same FLOPs); --tie-embeddings ties "
                   "them by hand")
    if cfg.seq_aux_loss_coef > 0:
        out.append(f"no sequence-wise balance loss (ours: alpha {cfg.seq_aux_loss_coef}); torchtitan has only the "
                   "aux-loss-free bias (its update also subtracts the mean step)")
    if args.precision == "bf16":
        out.append("bf16 parameters with bf16 AdamW moments and no fp32 master copy (ours, dtype auto: bf16 "
                   "weights with fp32 master and moments)")
    else:
        out.append("fp32 parameters + bf16 autocast (ours, dtype auto: bf16 weights with fp32 master and moments)")
    out.append(f"random {args.tokens} tokens (our bench_train.py: tokenized Zipf-like text)")
    out.append("torchtitan's init (trunc-normal, embedding std 1) instead of ours (normal, std "
               f"{cfg.initializer_range}): changes routing balance, not the arithmetic")
    return out


# -- main -------------------------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default 20; --tiny: 3)")
    ap.add_argument("--warmup", type=int, default=None,
                    help="untimed steps first, compilation happens here (default 3; --tiny: 1)")
    ap.add_argument("--micro-batch", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=None, help="default 4096; --tiny: 128")
    ap.add_argument("--mtp", type=int, default=0,
                    help="MTP depth requested; torchtitan 0.2.2's DeepSeek-V3 has no MTP, so >0 runs without it")
    ap.add_argument("--preset", default="openseek-small", help="our preset whose dimensions are used")
    ap.add_argument("--tiny", action="store_true", help="our 'tiny' preset (CPU smoke test)")
    ap.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    ap.add_argument("--precision", choices=("bf16", "autocast"), default="bf16",
                    help="bf16: bf16 params + fused AdamW (default); autocast: fp32 params + bf16 autocast")
    ap.add_argument("--compile", dest="compile", action=argparse.BooleanOptionalAction, default=None,
                    help="per-block torch.compile (default: on for cuda, off for cpu)")
    ap.add_argument("--compile-backend", default="inductor", help="inductor (default); aot_eager to check on CPU")
    ap.add_argument("--grouped-mm", dest="grouped_mm", action=argparse.BooleanOptionalAction, default=None,
                    help="torch._grouped_mm experts (default: on for SM90+, else torchtitan's for-loop)")
    ap.add_argument("--attn", choices=("sdpa", "flex"), default="sdpa", help="torchtitan attention type (causal)")
    ap.add_argument("--tie-embeddings", action="store_true",
                    help="share embedding and output weights (our preset ties; torchtitan's DeepSeek-V3 does not)")
    ap.add_argument("--tokens", choices=("uniform", "zipf"), default="uniform", help="random token distribution")
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--max-norm", type=float, default=1.0, help="grad-norm clip (0: none)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    args = ap.parse_args(argv)
    if args.tiny:
        args.preset = "tiny"
    for name, full, tiny in (("steps", 20, 3), ("warmup", 3, 1), ("seq_len", 4096, 128)):
        if getattr(args, name) is None:
            setattr(args, name, tiny if args.tiny else full)
    if args.steps < 1 or args.warmup < 0 or args.micro_batch < 1 or args.seq_len < 2 or args.mtp < 0:
        ap.error("need --steps >= 1, --warmup >= 0, --micro-batch >= 1, --seq-len >= 2, --mtp >= 0")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        import torch
    except ImportError as e:
        print(f"torchtitan_baseline: error: cannot import torch ({e})", file=sys.stderr)
        return 3
    tt = import_torchtitan()
    build_our_model, our_preset = import_openseek()

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("torchtitan_baseline: error: --device cuda but torch.cuda.is_available() is False", file=sys.stderr)
        return 2
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    cuda = device.type == "cuda"
    use_compile = cuda if args.compile is None else args.compile
    sm90 = cuda and torch.cuda.get_device_capability(device) >= (9, 0)
    grouped_mm = sm90 if args.grouped_mm is None else args.grouped_mm
    if grouped_mm and not cuda:
        print("torchtitan_baseline: error: --grouped-mm needs CUDA (torchtitan pads token groups with a Triton "
              "kernel)", file=sys.stderr)
        return 2

    env = environment(torch, tt)
    notes, warnings = [], []
    if tt.version != EXPECTED_TORCHTITAN:
        warnings.append(f"torchtitan is {tt.version}, this baseline was written for {EXPECTED_TORCHTITAN}")
    if args.mtp:
        warnings.append(f"--mtp {args.mtp} requested but torchtitan {tt.version}'s DeepSeek-V3 has no multi-token "
                        "prediction: running without MTP (FLOPs/MFU counted for MTP depth 0)")
    cfg = our_preset(args.preset, num_nextn_predict_layers=0, tie_word_embeddings=args.tie_embeddings)
    report = {"status": "running", "stage": "setup", "env": env, "warnings": warnings, "notes": notes,
              "shims": tt.shims}

    def write_report() -> None:
        if args.json is not None:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            tmp = args.json.with_name(args.json.name + ".tmp")
            tmp.write_text(json.dumps(report, indent=1, default=str))
            tmp.replace(args.json)

    try:
        return run(torch, tt, build_our_model, args, cfg, device, use_compile, grouped_mm, report, write_report)
    except Exception as e:  # noqa: BLE001 - record where it failed, then fail
        traceback.print_exc()
        report.update(status="failed", error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc())
        write_report()
        print(f"torchtitan_baseline: FAILED at stage '{report['stage']}': {type(e).__name__}: {e}", file=sys.stderr)
        return 1


def run(torch, tt, build_our_model, args, cfg, device, use_compile, grouped_mm, report, write_report) -> int:
    cuda = device.type == "cuda"
    warnings, notes = report["warnings"], report["notes"]
    B, S = args.micro_batch, args.seq_len
    tokens_per_step = B * S
    if S > cfg.max_position_embeddings:
        notes.append(f"seq-len {S} exceeds the preset's max_position_embeddings {cfg.max_position_embeddings}; "
                     "both models use plain RoPE (no YaRN) at this length")

    # our FLOPs-per-token formula, on our model built on the meta device with the same config
    report["stage"] = "flops"
    ours = build_our_model(cfg, "cpu", device="meta")
    flops_per_token = float(ours.flops_per_token(S))
    our_params = cfg.num_parameters(active=False, include_mtp=False)
    our_active = cfg.num_parameters(active=True, include_mtp=False)
    expected_titan_params = our_params  # same architecture; cfg ties iff --tie-embeddings
    del ours

    if not cuda:
        # torchtitan's router counts tokens with torch.histc on int64 indices, which only CUDA implements;
        # for the CPU smoke test only, count them in float32 (exact for these counts).
        histc = torch.histc

        def histc_any_dtype(input, *a, **kw):
            if input.is_floating_point():
                return histc(input, *a, **kw)
            return histc(input.float(), *a, **kw).to(input.dtype)  # CUDA's histc returns the input's dtype

        torch.histc = histc_any_dtype
        report["shims"].append("cpu only: torch.histc counts int64 input in float32 (torchtitan's router)")

    report["stage"] = "build"
    torch.manual_seed(args.seed)
    margs = titan_args(tt, cfg, S, grouped_mm, args.attn)
    t0 = time.perf_counter()
    model = build_titan_model(torch, tt, margs, device, args.precision, args.tie_embeddings)
    build_s = time.perf_counter() - t0
    n_params = sum(p.numel() for p in model.parameters())  # unique parameters (a tied weight counts once)
    if n_params != expected_titan_params:
        warnings.append(f"torchtitan model has {n_params:,} parameters, our config counts {expected_titan_params:,}"
                        " for the same architecture: the configs differ")
    param_dtypes = sorted({str(p.dtype) for p in model.parameters()})
    buffer_dtypes = {n: str(b.dtype) for n, b in model.named_buffers() if n.startswith("layers.1.") or "freqs" in n}

    config = {
        "preset": args.preset, "our_config": {k: v for k, v in cfg.to_dict().items()},
        "torchtitan_args": {f.name: (dataclasses.asdict(margs.moe_args) if f.name == "moe_args"
                                     else getattr(margs, f.name)) for f in dataclasses.fields(margs)},
        "micro_batch": B, "seq_len": S, "tokens_per_step": tokens_per_step, "warmup": args.warmup,
        "steps": args.steps, "mtp_requested": args.mtp, "mtp_run": 0, "device": str(device),
        "precision": args.precision, "compile": use_compile, "compile_backend": args.compile_backend if use_compile
        else None, "grouped_mm": grouped_mm, "attn": args.attn, "tie_embeddings": args.tie_embeddings,
        "tokens": args.tokens, "optimizer": {"name": "torch.optim.AdamW", "fused": True, "lr": args.lr,
                                             "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": args.weight_decay},
        "max_norm": args.max_norm, "activation_checkpointing": "none", "seed": args.seed,
        "peak_flops": PEAK_FLOPS, "flops_per_token": flops_per_token,
        "flops_formula": "openseek_hal DeepseekV3.flops_per_token(seq_len), MTP depth 0",
    }
    report["config"] = config
    report["differences_vs_openseek_small"] = differences(args, cfg)
    report["regime"] = (
        "bf16 parameters, gradients and AdamW moments (fused AdamW); routing buffers fp32"
        if args.precision == "bf16" else
        "fp32 parameters/gradients/AdamW moments (fused AdamW), forward and loss under torch.autocast(bfloat16) "
        "(torchtitan's own single-device regime)")
    report["checks"] = checks = {
        "parameters": n_params, "parameters_expected_from_our_config": expected_titan_params,
        "active_parameters_our_config": our_active, "parameter_dtypes": param_dtypes,
        "buffer_dtypes_layer1": buffer_dtypes, "build_seconds": round(build_s, 2),
    }
    log(f"torchtitan {tt.version} DeepSeekV3Model ({args.preset} dims): {n_params / 1e6:,.1f}M parameters "
        f"({our_active / 1e6:,.1f}M active/token), params {param_dtypes}, device {device}, precision "
        f"{args.precision}, compile {use_compile}, grouped_mm {grouped_mm}, attn {args.attn}")
    for w in warnings:
        log(f"WARNING: {w}")

    if cuda and args.attn == "sdpa":
        report["stage"] = "sdpa-probe"
        checks["sdpa_backends"] = sdpa = probe_sdpa(torch, B, S, cfg.num_attention_heads, cfg.qk_head_dim,
                                                    cfg.v_head_dim, device)
        log(f"SDPA backends for q/k dim {cfg.qk_head_dim}, v dim {cfg.v_head_dim}: {sdpa}")
        if sdpa["torchtitan_uses"] in (None, "MATH"):
            warnings.append(f"torchtitan's SDPA falls back to {sdpa['torchtitan_uses']} for MLA's head dims: "
                            "the attention of this baseline is not a fused kernel")
        torch.cuda.empty_cache()

    report["stage"] = "compile-setup"
    loss_fn = tt.cross_entropy_loss
    if use_compile:
        plain_grouped_mm = tt.moe_module._run_experts_grouped_mm
        tt.apply_compile(model, tt.CompileConfig(enable=True, backend=args.compile_backend), False)
        loss_fn = torch.compile(loss_fn, backend=args.compile_backend)
        checks["compiled_modules"] = sorted(n for n, m in model.named_modules()
                                           if type(m).__name__ == "OptimizedModule")
        checks["compiled_grouped_mm"] = tt.moe_module._run_experts_grouped_mm is not plain_grouped_mm

    report["stage"] = "optimizer"
    params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=args.weight_decay,
                            fused=True)
    opt.register_step_pre_hook(expert_bias_hook(torch, model))

    gen = torch.Generator(device=device).manual_seed(args.seed)
    n_batches = 4
    if args.tokens == "zipf":
        weights = 1.0 / (torch.arange(cfg.vocab_size, device=device, dtype=torch.float32) + 10.0)
        batches = [torch.multinomial(weights, B * (S + 1), replacement=True, generator=gen).view(B, S + 1)
                   for _ in range(n_batches)]
    else:
        batches = [torch.randint(0, cfg.vocab_size, (B, S + 1), device=device, generator=gen)
                   for _ in range(n_batches)]
    batches = [(t[:, :-1].contiguous(), t[:, 1:].contiguous()) for t in batches]
    amp = (torch.autocast(device.type, dtype=torch.bfloat16) if args.precision == "autocast"
           else contextlib.nullcontext())
    sync = torch.cuda.synchronize if cuda else (lambda *a: None)

    def train_step(i: int):
        inputs, labels = batches[i % n_batches]
        with amp:
            masks = model.get_attention_masks(inputs, tokenizer=None) if args.attn == "flex" else None
            pred = model(inputs, attention_masks=masks)
            loss = loss_fn(pred, labels) / labels.numel()
        del pred
        loss.backward()
        grad_norm = (torch.nn.utils.clip_grad_norm_(params, args.max_norm, foreach=cuda or None)
                     if args.max_norm > 0 else None)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach(), grad_norm

    def dynamo_stats() -> dict:
        try:
            from torch._dynamo.utils import counters

            return {"unique_graphs": int(counters["stats"].get("unique_graphs", 0)),
                    "graph_breaks": int(sum(counters["graph_break"].values()))}
        except Exception:  # noqa: BLE001
            return {}

    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    report["stage"] = "warmup"
    write_report()
    losses, grad_norms = [], []
    t0 = time.perf_counter()
    for i in range(args.warmup):
        ts = time.perf_counter()
        loss, gn = train_step(i)
        sync()
        losses.append(float(loss))
        grad_norms.append(None if gn is None else float(gn))
        log(f"warmup step {i + 1}/{args.warmup}: {time.perf_counter() - ts:.2f}s, loss {losses[-1]:.4f}")
    warmup_s = time.perf_counter() - t0
    peak_warm = torch.cuda.max_memory_allocated(device) if cuda else None
    stats_before = dynamo_stats()

    report["stage"] = "timed"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(args.steps)]
    timed_losses, timed_norms, cpu_times = [], [], []
    sync()
    t0 = time.perf_counter()
    for i in range(args.steps):
        ts = time.perf_counter()
        if cuda:
            events[i][0].record()
        loss, gn = train_step(args.warmup + i)
        if cuda:
            events[i][1].record()
        timed_losses.append(loss)
        timed_norms.append(gn)
        cpu_times.append(time.perf_counter() - ts)
    sync()
    elapsed = time.perf_counter() - t0
    peak_timed = torch.cuda.max_memory_allocated(device) if cuda else None
    stats_after = dynamo_stats()
    step_ms = [s.elapsed_time(e) for s, e in events] if cuda else [1e3 * t for t in cpu_times]

    report["stage"] = "checks"
    timed_loss_values = [float(x) for x in timed_losses]
    losses += timed_loss_values
    grad_norms += [None if g is None else float(g) for g in timed_norms]
    finite = all(math.isfinite(x) for x in losses)
    biases = [b.moe.expert_bias for b in moe_blocks(model) if b.moe.expert_bias is not None]
    bias_moved = bool(biases) and any(float(b.abs().sum()) > 0 for b in biases)
    ln_v = math.log(cfg.vocab_size)
    checks.update({
        "losses_finite": finite, "first_loss": losses[0], "last_loss": losses[-1], "ln_vocab": ln_v,
        "expert_bias_updated": bias_moved, "expert_bias_dtype": str(biases[0].dtype) if biases else None,
        "grad_norm_first": grad_norms[0], "grad_norm_last": grad_norms[-1],
        "dynamo_after_warmup": stats_before, "dynamo_after_timed": stats_after,
    })
    if stats_after.get("unique_graphs", 0) > stats_before.get("unique_graphs", 0):
        warnings.append(f"torch.compile compiled new graphs during the timed steps ({stats_before} -> "
                        f"{stats_after}): the timing includes compilation; raise --warmup")
    if not 0.5 * ln_v <= losses[0] <= 3 * ln_v:
        warnings.append(f"first loss {losses[0]:.3f} is far from ln(vocab) = {ln_v:.3f}")
    if biases and not bias_moved:
        warnings.append("the aux-loss-free expert bias did not move")

    tokens_per_s = args.steps * tokens_per_step / elapsed
    sorted_ms = sorted(step_ms)
    results = {
        "tokens_per_s": tokens_per_s, "step_ms_mean": 1e3 * elapsed / args.steps,
        "step_ms_median": sorted_ms[len(sorted_ms) // 2], "step_ms_min": sorted_ms[0], "step_ms_max": sorted_ms[-1],
        "step_ms_each": [round(x, 3) for x in step_ms], "timed_seconds": elapsed, "warmup_seconds": warmup_s,
        "mfu": tokens_per_s * flops_per_token / PEAK_FLOPS if cuda else None,
        "model_tflops_per_s": tokens_per_s * flops_per_token / 1e12,
        "peak_memory_mib": max(peak_warm, peak_timed) / 2 ** 20 if cuda else None,
        "peak_memory_timed_mib": peak_timed / 2 ** 20 if cuda else None,
        "peak_memory_warmup_mib": peak_warm / 2 ** 20 if cuda else None,
        "parameters": n_params, "active_parameters": our_active, "losses": losses, "grad_norms": grad_norms,
    }
    report["results"] = results
    report["status"] = "ok" if finite else "failed"
    report["stage"] = "done"
    if not finite:
        report["error"] = "non-finite loss"
    write_report()

    for w in warnings:
        log(f"WARNING: {w}")
    mfu = f"{100 * results['mfu']:.1f}%" if results["mfu"] is not None else "n/a"
    peak = f"{results['peak_memory_mib']:,.0f}" if results["peak_memory_mib"] is not None else "n/a"
    print(f"\n{'impl':<22} {'card':<22} {'prec':<8} {'B x S':>10} {'tok/s':>10} {'step ms':>9} {'MFU':>6} "
          f"{'peak MiB':>9} {'params':>8} {'loss':>15}")
    print(f"{'torchtitan ' + tt.version + (' compiled' if use_compile else ' eager'):<22} "
          f"{str(report['env']['card'])[:22]:<22} {args.precision:<8} {f'{B} x {S}':>10} {tokens_per_s:>10,.0f} "
          f"{results['step_ms_mean']:>9.1f} {mfu:>6} {peak:>9} {n_params / 1e6:>7.1f}M "
          f"{f'{losses[0]:.3f}->{losses[-1]:.3f}':>15}")
    if args.json is not None:
        log(f"wrote {args.json}")
    if not finite:
        print("torchtitan_baseline: FAILED: non-finite loss", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
