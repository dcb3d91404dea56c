"""The trainer's AdamW (the backend's ``adamw`` op) follows ``torch.optim.AdamW`` step for step."""

from __future__ import annotations

import torch

from openseek_hal.train.optim import AdamW


def _model(seed: int, device: torch.device) -> torch.nn.Module:
    # float64: the two optimizers round their updates differently, the models then drift apart by an
    # ulp, and Adam amplifies a gradient difference dg by up to lr / eps where a second moment is near
    # eps; in float64 that stays below 1e-9 over these steps on any CPU, far inside the tolerances
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 4)).to(
        device, torch.float64)


def test_matches_torch_adamw(backend):
    device = backend.device.torch_device
    ours_model, ref_model = _model(0, device), _model(0, device)
    hyper = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    ours = AdamW([{"params": [ours_model[0].weight, ours_model[2].weight]},
                  {"params": [ours_model[0].bias, ours_model[2].bias], "weight_decay": 0.0}], backend, **hyper)
    ref = torch.optim.AdamW([{"params": [ref_model[0].weight, ref_model[2].weight]},
                             {"params": [ref_model[0].bias, ref_model[2].bias], "weight_decay": 0.0}],
                            foreach=False, **hyper)
    gen = torch.Generator().manual_seed(1)
    for _ in range(5):
        x = torch.randn(8, 16, generator=gen, dtype=torch.float64).to(device)
        for model, opt in ((ours_model, ours), (ref_model, ref)):
            model(x).square().mean().backward()
            opt.step()
            opt.zero_grad()
    for p, q in zip(ours_model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    state, ref_state = ours.state[ours_model[0].weight], ref.state[ref_model[0].weight]
    assert int(state["step"]) == int(ref_state["step"]) == 5
    torch.testing.assert_close(state["exp_avg_sq"], ref_state["exp_avg_sq"], rtol=1e-5, atol=1e-9)
    # a parameter without a gradient is left alone, as torch does
    frozen = torch.nn.Parameter(torch.ones(3, device=device))
    opt = AdamW([frozen], backend, lr=1.0)
    opt.step()
    assert torch.equal(frozen, torch.ones(3, device=device)) and not opt.state[frozen]
