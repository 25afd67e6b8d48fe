"""FedAvg aggregation and the FedProx proximal term: exact identities, autograd and finite differences."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from fedlatent.fl.aggregate import fedavg, fedprox_term
from fedlatent.fl.client import local_train
from fedlatent.utils import FedLatentError


def _rand(shape, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=dtype)


def test_fedavg_flat_equals_weighted_mean_exactly():
    vecs = [_rand((37,), s) for s in range(4)]
    n = [3, 10, 1, 6]
    got = fedavg(vecs, n)
    # independent reference: numpy float64 sum_k n_k w_k / sum n
    ref = sum(nk * v.numpy() for nk, v in zip(n, vecs)) / sum(n)
    assert got.dtype == torch.float64
    np.testing.assert_allclose(got.numpy(), ref, rtol=0, atol=1e-15)


def test_fedavg_dict_matches_per_key_mean_and_keeps_dtypes():
    n = [5, 2, 9]
    dicts = [{"a": _rand((3, 4), 10 + i), "b": _rand((2,), 20 + i, torch.float32),
              "cnt": torch.tensor(10 * (i + 1), dtype=torch.int64)} for i in range(3)]
    out = fedavg(dicts, n)
    assert set(out) == {"a", "b", "cnt"}
    w = np.array(n, dtype=np.float64) / sum(n)
    np.testing.assert_allclose(out["a"].numpy(), sum(wi * d["a"].numpy() for wi, d in zip(w, dicts)), rtol=0, atol=1e-15)
    assert out["b"].dtype == torch.float32
    ref_b = sum(wi * d["b"].double().numpy() for wi, d in zip(w, dicts)).astype(np.float32)
    np.testing.assert_array_equal(out["b"].numpy(), ref_b)
    # integer buffer: weighted mean rounded to nearest (10*5 + 20*2 + 30*9) / 16 = 22.5 -> 22 (round half even)
    assert out["cnt"].dtype == torch.int64 and int(out["cnt"]) == round((10 * 5 + 20 * 2 + 30 * 9) / 16)


def test_fedavg_identical_inputs_and_single_input_are_fixed_points():
    v32 = _rand((11,), 3, torch.float32)  # float32 averaged in float64: exact after rounding back
    assert torch.equal(fedavg([v32, v32, v32], [1, 7, 2]), v32)
    v = _rand((11,), 3)
    assert torch.equal(fedavg([v], [4]), v)
    assert torch.allclose(fedavg([v, v, v], [1, 7, 2]), v, rtol=4e-16, atol=0)  # float64: within an ulp or two


def test_fedavg_bad_inputs():
    v = _rand((5,), 0)
    with pytest.raises(FedLatentError):
        fedavg([], [])
    with pytest.raises(FedLatentError):
        fedavg([v, v], [1])
    with pytest.raises(FedLatentError):
        fedavg([v, v], [0, 0])
    with pytest.raises(FedLatentError):
        fedavg([v, v], [1, -1])
    with pytest.raises(FedLatentError):
        fedavg([v, _rand((6,), 1)], [1, 1])
    with pytest.raises(FedLatentError):
        fedavg([{"a": v}, {"b": v}], [1, 1])


def test_fedprox_term_value_and_gradient_closed_form():
    w = _rand((4, 3), 1).requires_grad_(True)
    b = _rand((3,), 2).requires_grad_(True)
    wg, bg = _rand((4, 3), 3), _rand((3,), 4)
    mu = 0.37
    val = fedprox_term({"w": w, "b": b}, {"w": wg, "b": bg}, mu)
    expect = 0.5 * mu * (((w - wg) ** 2).sum() + ((b - bg) ** 2).sum())
    assert torch.allclose(val, expect, rtol=0, atol=1e-14)
    gw, gb = torch.autograd.grad(val, [w, b])
    assert torch.allclose(gw, mu * (w - wg).detach(), rtol=0, atol=1e-14)
    assert torch.allclose(gb, mu * (b - bg).detach(), rtol=0, atol=1e-14)
    # the global weights are constants: no gradient flows into them
    wg_req = wg.clone().requires_grad_(True)
    assert torch.autograd.grad(fedprox_term([w], [wg_req], mu), [wg_req], allow_unused=True)[0] is None


def test_fedprox_term_finite_differences():
    w = _rand((6,), 5)
    wg = _rand((6,), 6)
    mu, eps = 1.3, 1e-6
    fd = torch.zeros_like(w)
    for i in range(w.numel()):
        e = torch.zeros_like(w)
        e[i] = eps
        fd[i] = (fedprox_term(w + e, wg, mu) - fedprox_term(w - e, wg, mu)) / (2 * eps)
    assert torch.allclose(fd, mu * (w - wg), rtol=0, atol=1e-8)


def test_local_train_one_sgd_step_includes_prox_gradient():
    """One full-batch step of local_train == w - lr * (dCE/dw + mu (w - w_g)) computed by hand."""
    torch.manual_seed(0)
    model = nn.Linear(5, 3).double()
    x, y = _rand((8, 5), 7), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    w0 = {k: v.detach().clone() for k, v in model.named_parameters()}
    wg = {k: v + 0.5 * _rand(v.shape, 30 + i) for i, (k, v) in enumerate(w0.items())}
    lr, mu = 0.1, 2.0
    ref = nn.Linear(5, 3).double()
    ref.load_state_dict(w0)
    ce = nn.functional.cross_entropy(ref(x), y)
    grads = torch.autograd.grad(ce, list(ref.parameters()))
    expect = {k: w0[k] - lr * (g + mu * (w0[k] - wg[k])) for (k, _), g in zip(ref.named_parameters(), grads)}
    local_train(model, x, y, epochs=1, lr=lr, batch_size=len(y), generator=torch.Generator().manual_seed(0),
                global_params=wg, mu=mu)
    for k, p in model.named_parameters():
        assert torch.allclose(p.detach(), expect[k], rtol=0, atol=1e-12), k
