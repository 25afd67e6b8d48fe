"""Reading a client's classes off its upload (fedlatent.fl.label_inference) for FedDGM's classes='inferred'."""
from __future__ import annotations

import pytest
import torch

from fedlatent.errors import FedLatentError


def _client(digits16, classes, steps_epochs=2, seed=0):
    """A ConvNet's start and end parameters after local SGD on the digits of ``classes`` only."""
    from fedlatent.fl.client import local_train
    from fedlatent.models import get_model
    from fedlatent.models.functional import FlatModel

    torch.manual_seed(seed)
    model = get_model("convnet:width=8", 1, 10, 16)
    flat = FlatModel(model)
    start = flat.flatten().clone()
    x, y = digits16.x_train, digits16.y_train
    keep = torch.isin(y, torch.tensor(classes))
    local_train(model, x[keep], y[keep], epochs=steps_epochs, lr=0.01, batch_size=32, momentum=0.0,
                weight_decay=0.0, generator=torch.Generator().manual_seed(seed))
    return flat, start, flat.flatten()


@pytest.mark.parametrize("classes", [[3], [1, 7], [0, 4, 8]])
def test_the_classes_a_client_trained_on_are_read_off_its_bias(digits16, classes):
    from fedlatent.fl.label_inference import bias_change, present_classes

    flat, start, end = _client(digits16, classes)
    db = bias_change(flat, start, end)
    assert db.shape == (10,)
    assert sorted(present_classes(db).tolist()) == classes
    absent = [c for c in range(10) if c not in classes]
    assert (db[absent] < 0).all()  # absent classes' biases fall at every step


def test_allocate_spreads_the_budget_evenly():
    from fedlatent.fl.label_inference import allocate, present_classes

    got = allocate(20, torch.tensor([3, 7, 1]))
    assert got.tolist() == [1] * 6 + [3] * 7 + [7] * 7  # the remainder goes to the first-listed (largest rise)
    assert allocate(4, torch.tensor([2])).tolist() == [2, 2, 2, 2]
    assert present_classes(torch.tensor([-0.3, -0.1, -0.2])).tolist() == [1]  # none rose: the least fallen
    assert present_classes(torch.tensor([0.1, -0.1, 0.5])).tolist() == [2, 0]
    with pytest.raises(FedLatentError, match="budget"):
        allocate(2, torch.tensor([0, 1, 2]))


def test_a_model_without_an_output_bias_is_a_clear_error():
    from fedlatent.fl.label_inference import bias_change
    from fedlatent.models.functional import FlatModel

    flat = FlatModel(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3, bias=False)))
    th = flat.flatten()
    with pytest.raises(FedLatentError, match="output bias"):
        bias_change(flat, th, th)
