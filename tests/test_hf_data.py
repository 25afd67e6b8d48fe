"""Flower Datasets / Hugging Face interop, offline: a DatasetDict built here and saved to disk (``hf:PATH``), and a
flwr_datasets partitioner whose partitions become the clients' data exactly."""
from __future__ import annotations

import csv

import numpy as np
import pytest
import torch

from fedlatent.utils import FedLatentError

datasets = pytest.importorskip("datasets")

N_TRAIN, N_TEST, SIZE, CLASSES = 120, 30, 8, ["zero", "one", "two"]


def _dataset(n: int, seed: int, rgb: bool = True):
    rng = np.random.default_rng(seed)
    shape = (SIZE, SIZE, 3) if rgb else (SIZE, SIZE)
    imgs = [rng.integers(0, 256, shape, dtype=np.uint8) for _ in range(n)]
    labels = [int(v) for v in rng.integers(0, len(CLASSES), n)]
    feats = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(names=CLASSES)})
    return datasets.Dataset.from_dict({"img": imgs, "label": labels}, features=feats), np.stack(imgs), np.array(labels)


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    train, x, y = _dataset(N_TRAIN, 0)
    test, _, _ = _dataset(N_TEST, 1)
    path = tmp_path_factory.mktemp("hf") / "toy"
    datasets.DatasetDict({"train": train, "test": test}).save_to_disk(str(path))
    return path, x, y


def test_load_from_disk_keeps_pixels_labels_and_class_names(hf_folder):
    from fedlatent.data import load_dataset

    path, x, y = hf_folder
    d = load_dataset(f"hf:{path}")
    assert d.classes == CLASSES and d.name == "toy" and d.channels == 3 and d.image_size == SIZE
    assert len(d.y_train) == N_TRAIN and len(d.y_test) == N_TEST and torch.equal(d.y_train, torch.from_numpy(y))
    back = (d.denormalize(d.x_train) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    assert np.array_equal(back, x)  # the pixels survive the normalisation round trip
    assert d.mean == pytest.approx(tuple(x.reshape(-1, 3).mean(0) / 255.0))


def test_simulate_cli_on_hf_folder(hf_folder, tmp_path):
    from click.testing import CliRunner

    from fedlatent.cli import main

    path, _, _ = hf_folder
    r = CliRunner().invoke(main, ["simulate", "--dataset", f"hf:{path}", "--clients", "2", "--rounds", "1",
                                  "--model", "convnet:width=4", "--min-size", "2", "--out", str(tmp_path / "r"),
                                  "--quiet"])
    assert r.exit_code == 0, r.output
    assert "final accuracy" in r.output


def test_partitioner_partitions_are_the_clients_data(hf_folder, tmp_path):
    from flwr_datasets.partitioner import DirichletPartitioner

    from fedlatent.data.hf import from_partitioner
    from fedlatent.fl import simulate

    path, _, _ = hf_folder
    dd = datasets.load_from_disk(str(path))
    part = DirichletPartitioner(num_partitions=3, partition_by="label", alpha=0.3, seed=4, min_partition_size=5)
    data = from_partitioner(part, dd["test"], train=dd["train"])
    expect = [np.bincount(np.asarray(part.load_partition(c)["label"]), minlength=3) for c in range(3)]
    got = [np.bincount(data.y_train[p].numpy(), minlength=3) for p in data.extra["partitions"]]
    assert [list(e) for e in expect] == [list(g) for g in got]
    res = simulate(data=data, clients=3, rounds=1, participation=1.0, model="convnet:width=4", out=tmp_path / "r",
                   progress=False)
    assert res.rounds == 1
    with open(tmp_path / "r" / "partition.csv", newline="") as f:  # what the engine gave each client
        rows = [r for r in csv.DictReader(f) if r.get("client", "").isdigit()]
    engine = [[int(float(r[c])) for c in CLASSES] for r in sorted(rows, key=lambda r: int(r["client"]))]
    assert engine == [list(e) for e in expect]
    with pytest.raises(FedLatentError, match="3 partitions .* set clients=3"):
        simulate(data=data, clients=4, rounds=1, progress=False)


def test_iid_partitioner_and_grayscale(tmp_path):
    from flwr_datasets.partitioner import IidPartitioner

    from fedlatent.data.hf import from_partitioner

    train, x, _ = _dataset(40, 2, rgb=False)
    test, _, _ = _dataset(10, 3, rgb=False)
    part = IidPartitioner(num_partitions=4)
    part.dataset = train
    data = from_partitioner(part, test)
    assert data.channels == 1 and [len(p) for p in data.extra["partitions"]] == [10, 10, 10, 10]
    first = np.asarray(part.load_partition(0).with_format("numpy")["img"][0])
    back = (data.denormalize(data.x_train[:1]) * 255).round().to(torch.uint8)[0, 0].numpy()
    assert np.array_equal(back, first)


def test_bad_inputs_are_clear_errors(tmp_path, hf_folder):
    from fedlatent.data import load_dataset
    from fedlatent.data.hf import from_partitioner

    with pytest.raises(FedLatentError, match="does not exist"):
        load_dataset(f"hf:{tmp_path / 'nope'}")
    train, _, _ = _dataset(10, 0)
    train.save_to_disk(str(tmp_path / "single"))
    with pytest.raises(FedLatentError, match="'train' and 'test' splits"):
        load_dataset(f"hf:{tmp_path / 'single'}")
    (tmp_path / "junk").mkdir()
    with pytest.raises(FedLatentError, match="not a dataset saved with save_to_disk"):
        load_dataset(f"hf:{tmp_path / 'junk'}")
    from flwr_datasets.partitioner import IidPartitioner

    with pytest.raises(FedLatentError, match="no dataset"):
        from_partitioner(IidPartitioner(num_partitions=2), train)
    no_img = datasets.Dataset.from_dict({"feat": [[1, 2]] * 4, "label": [0, 1, 0, 1]})
    with pytest.raises(FedLatentError, match="no image column"):
        from_partitioner(IidPartitioner(num_partitions=2), no_img, train=no_img)


def test_partitioner_data_drive_feddgm(hf_folder, tmp_path):
    from flwr_datasets.partitioner import IidPartitioner

    from fedlatent import distill_federated
    from fedlatent.data.hf import from_partitioner

    path, _, _ = hf_folder
    dd = datasets.load_from_disk(str(path))
    data = from_partitioner(IidPartitioner(num_partitions=2), dd["test"], train=dd["train"], name="toy-iid")
    res = distill_federated(data=data, clients=2, participation=1.0, rounds=1, local_epochs=1, space="pixel",
                            model="convnet:width=4", surrogate="convnet:width=4", ipc=1, iterations=1, syn_steps=2,
                            train_epochs=1, out=tmp_path / "r", progress=False)
    assert res.simulation.rounds == 1 and res.distilled.is_file()
    import json

    assert json.loads((tmp_path / "r" / "config.json").read_text())["partition_given"] == "IidPartitioner (2 partitions)"
