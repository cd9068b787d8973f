"""Gradients of a real training run, for accuracy tests: consecutive gradients are correlated,
which random vectors hide (the window is then badly conditioned)."""

from __future__ import annotations

import torch


def digits_sgd_gradients(steps: int = 150, device: str | torch.device = "cpu") -> torch.Tensor:
    """``(steps, 4810)`` float64 gradients of SGD on an MLP (64-64-10) over scikit-learn's digits."""
    from sklearn.datasets import load_digits

    torch.manual_seed(0)
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float64)
    y = torch.tensor(y)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Tanh(), torch.nn.Linear(64, 10)).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(0)
    grads = []
    for _ in range(steps):
        idx = torch.randint(0, len(x), (32,), generator=gen)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        grads.append(torch.nn.utils.parameters_to_vector([p.grad for p in model.parameters()]).detach().clone())
        opt.step()
    return torch.stack(grads).to(device)
