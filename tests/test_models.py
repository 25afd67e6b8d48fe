"""Model registry: shapes for every architecture, ConvNet-D3 structure, FlatModel round trip."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from fedlatent.models import MODELS, ConvNet, get_model, parse_model_spec
from fedlatent.models.functional import FlatModel
from fedlatent.utils import FedLatentError


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("channels,size", [(1, 28), (1, 32), (3, 28), (3, 32)])
def test_output_shapes(name, channels, size):
    torch.manual_seed(0)
    if name == "convnet-d5" and size == 28:
        # five 2x2 pools: 28 -> 14 -> 7 -> 3 -> 1 -> 0
        with pytest.raises(FedLatentError, match="too small for ConvNet depth 5"):
            get_model(name, channels, 10, size)
        return
    m = get_model(name, channels, 7, size).eval()
    with torch.no_grad():
        out = m(torch.randn(3, channels, size, size))
    assert out.shape == (3, 7) and torch.isfinite(out).all()


def test_convnet_d3_structure():
    m = get_model("convnet-d3", 3, 10, 32)
    assert isinstance(m, ConvNet)
    convs = [l for l in m.modules() if isinstance(l, nn.Conv2d)]
    norms = [l for l in m.modules() if isinstance(l, nn.GroupNorm)]
    pools = [l for l in m.modules() if isinstance(l, nn.AvgPool2d)]
    assert len(convs) == len(norms) == len(pools) == 3
    assert all(c.out_channels == 128 and c.kernel_size == (3, 3) and c.padding == (1, 1) for c in convs)
    # instance norm written as GroupNorm(128, 128) with learnable affine parameters
    assert all(n.num_groups == 128 and n.num_channels == 128 and n.affine for n in norms)
    assert not any(isinstance(l, (nn.BatchNorm2d, nn.MaxPool2d)) for l in m.modules())
    assert m.classifier.in_features == 128 * 4 * 4 and m.classifier.out_features == 10
    # 3*128*9+128 + 2*(128*128*9+128) + 3*256 (norms) + 2048*10+10
    assert sum(p.numel() for p in m.parameters()) == 320_010
    # order inside a block: conv -> norm -> relu -> pool
    kinds = [type(l) for l in m.features]
    assert kinds[:4] == [nn.Conv2d, nn.GroupNorm, nn.ReLU, nn.AvgPool2d]


def test_convnet_depth_from_size_and_options():
    assert sum(isinstance(l, nn.Conv2d) for l in get_model("convnet", 3, 10, 32).modules()) == 3
    assert sum(isinstance(l, nn.Conv2d) for l in get_model("convnet", 3, 10, 64).modules()) == 4
    m = get_model("convnet:width=32,depth=2", 1, 10, 28)
    convs = [l for l in m.modules() if isinstance(l, nn.Conv2d)]
    assert len(convs) == 2 and convs[0].out_channels == 32 and m.classifier.in_features == 32 * 7 * 7
    assert parse_model_spec("ConvNet:width=64, norm=batchnorm") == ("convnet", {"width": 64, "norm": "batchnorm"})
    assert any(isinstance(l, nn.BatchNorm2d) for l in get_model("convnet:norm=batchnorm", 1, 10, 28).modules())


def test_vgg11_norms():
    """Small-input VGG-11 "A": 8 convs and 5 max-pools; instance norm (GroupNorm(C, C)) after every conv by
    default, batch norm or none on request; torchvision's VGG-11 above 64 px (no instance-norm variant)."""
    cfg = [64, 128, 256, 256, 512, 512, 512, 512]
    m = get_model("vgg11", 3, 10, 32)
    convs = [l for l in m.modules() if isinstance(l, nn.Conv2d)]
    norms = [l for l in m.modules() if isinstance(l, nn.GroupNorm)]
    assert [c.out_channels for c in convs] == cfg and sum(isinstance(l, nn.MaxPool2d) for l in m.modules()) == 5
    assert [(n.num_groups, n.num_channels, n.affine) for n in norms] == [(c, c, True) for c in cfg]
    kinds = [type(l) for l in m.features]
    assert kinds[:4] == [nn.Conv2d, nn.GroupNorm, nn.ReLU, nn.MaxPool2d]
    plain = get_model("vgg11:norm=none", 1, 10, 28)
    assert not any(isinstance(l, (nn.GroupNorm, nn.BatchNorm2d)) for l in plain.modules())
    assert sum(isinstance(l, nn.BatchNorm2d) for l in get_model("vgg11:norm=batchnorm", 3, 10, 32).modules()) == 8
    # 28 px: the first conv pads to 32 so that the five pools fit; no norm adds only 2 * sum(cfg) parameters
    assert sum(p.numel() for p in m.parameters()) - sum(p.numel() for p in get_model("vgg11:norm=none", 3, 10, 32)
                                                       .parameters()) == 2 * sum(cfg)
    with pytest.raises(FedLatentError, match="unknown VGG-11 norm 'layer'"):
        get_model("vgg11:norm=layer", 3, 10, 32)
    with pytest.raises(FedLatentError, match="norm must be batchnorm or none"):
        get_model("vgg11:norm=instancenorm", 3, 10, 96)
    big = get_model("vgg11", 3, 10, 96)
    assert not any(isinstance(l, (nn.GroupNorm, nn.BatchNorm2d)) for l in big.modules())
    assert any(isinstance(l, nn.BatchNorm2d) for l in get_model("vgg11:norm=batchnorm", 3, 10, 96).modules())


@pytest.mark.parametrize("spec,match", [
    ("transformer", "unknown architecture 'transformer'"),
    ("convnet:width", "not key=value"),
    ("convnet:norm=layernorm", "unknown ConvNet norm"),
    ("convnet:pooling=median", "unknown ConvNet pooling"),
    ("convnet-d3:colour=red", "bad options"),
])
def test_bad_specs(spec, match):
    with pytest.raises(FedLatentError, match=match):
        get_model(spec, 3, 10, 32)


@pytest.mark.parametrize("name", ["convnet-d3", "alexnet", "resnet18"])
def test_flat_model_round_trip(name):
    torch.manual_seed(1)
    m = get_model(name, 3, 10, 32).eval()
    flat = FlatModel(m)
    theta = flat.flatten()
    assert theta.ndim == 1 and theta.numel() == flat.numel == sum(p.numel() for p in m.parameters())
    params = flat.params(theta)
    assert list(params) == [n for n, _ in m.named_parameters()]
    for n, p in m.named_parameters():
        assert torch.equal(params[n], p)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(flat(theta, x), m(x))
        # a different vector changes the output; load() makes the module agree with it exactly
        theta2 = theta + 0.01 * torch.randn_like(theta)
        y2 = flat(theta2, x)
        assert not torch.equal(y2, m(x))
        flat.load(theta2)
        assert torch.equal(m(x), y2) and torch.equal(flat.flatten(), theta2)
    with pytest.raises(ValueError):
        flat.params(theta[:-1])


def test_flat_model_gradient_flows_to_vector():
    torch.manual_seed(2)
    m = get_model("convnet:width=8", 1, 3, 16)
    flat = FlatModel(m)
    theta = flat.flatten().requires_grad_(True)
    x, y = torch.randn(5, 1, 16, 16), torch.tensor([0, 1, 2, 0, 1])
    nn.functional.cross_entropy(flat(theta, x), y).backward()
    nn.functional.cross_entropy(m(x), y).backward()
    ref = torch.cat([p.grad.reshape(-1) for p in m.parameters()])
    assert torch.allclose(theta.grad, ref, atol=1e-6)
