"""One distilled-set format for FedDGM, DynaFed and pixel-MTT sets; files of earlier versions still load."""
from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from fedlatent.artifacts.pseudo import PseudoSet, load_pseudo_set, save_pseudo_set
from fedlatent.export import load_distilled


def test_a_pseudo_set_is_a_distilled_set_with_soft_labels_and_lr(tmp_path):
    g = torch.Generator().manual_seed(0)
    p = PseudoSet(torch.randn(6, 1, 8, 8, generator=g), torch.randn(6, 3, generator=g), 0.25)
    meta = {"dataset": "digits", "class_names": ["a", "b", "c"], "mean": [0.5], "std": [0.25], "ipc": 2, "seed": 1}
    save_pseudo_set(tmp_path / "p.safetensors", p, meta, losses=[2.0, 1.0])
    ds, m = load_distilled(tmp_path / "p.safetensors")
    assert m["label_kind"] == "soft" and m["class_names"] == ["a", "b", "c"] and m["dataset"] == "digits"
    assert torch.equal(ds.images, p.images) and torch.equal(ds.labels, p.label_logits)
    assert ds.lr == pytest.approx(0.25) and ds.loss_history == [2.0, 1.0] and m["extra"]["method"] == "dynafed"


def test_files_of_earlier_versions_still_load(tmp_path):
    x = torch.randn(4, 1, 8, 8)
    logits = torch.randn(4, 2)
    save_file({"images": x, "label_logits": logits, "soft_labels": torch.softmax(logits, 1),
               "lr": torch.tensor([0.5]), "synthesis_loss": torch.tensor([3.0])}, str(tmp_path / "old.safetensors"),
              metadata={"format": "fedlatent.dynafed.pseudo/1", "mean": json.dumps([0.1]), "std": json.dumps([0.3]),
                        "ipc": "2", "synth_round": "4"})
    q, meta, losses = load_pseudo_set(tmp_path / "old.safetensors")
    assert torch.equal(q.images, x) and torch.equal(q.label_logits, logits) and q.lr == 0.5 and losses == [3.0]
    assert meta == {"mean": [0.1], "std": [0.3], "ipc": 2, "synth_round": 4}
    save_file({"images": x, "labels": torch.tensor([0, 1, 0, 1]), "lr": torch.tensor([0.02], dtype=torch.float64)},
              str(tmp_path / "pix.safetensors"),
              metadata={"dataset": "digits", "arch": "convnet", "zca": "False", "mean": json.dumps([0.1]),
                        "std": json.dumps([0.3])})
    ds, m = load_distilled(tmp_path / "pix.safetensors")
    assert torch.equal(ds.labels, torch.tensor([0, 1, 0, 1])) and ds.lr == pytest.approx(0.02)
    assert m["dataset"] == "digits" and m["mean"] == [0.1] and m["extra"]["arch"] == "convnet"


def test_distill_pixels_writes_the_distilled_set_format(tmp_path):
    from fedlatent.cli import main

    args = ["distill-pixels", "--dataset", "digits", "--arch", "convnet:width=4,depth=2", "--ipc", "1",
            "--syn-steps", "2", "--expert-epochs", "1", "--max-start-epoch", "1", "--iterations", "2",
            "--num-experts", "1", "--train-limit", "10", "--eval-epochs", "0", "--quiet", "--out", str(tmp_path)]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    ds, meta = load_distilled(tmp_path / "distilled.safetensors")
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert len(ds) == 10 and meta["label_kind"] == "hard" and meta["extra"]["arch"] == "convnet:width=4,depth=2"
    assert ds.lr == pytest.approx(m["learned_lr"], rel=1e-6) and ds.loss_history == pytest.approx(m["loss_history"])
