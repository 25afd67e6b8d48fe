"""The end-of-command summary table: final / best metrics with their round, time, and the files."""
from __future__ import annotations

import pytest
from click.testing import CliRunner

from fedlatent.summary import format_seconds, render, summarize

ROWS = [{"round": 0, "accuracy": 0.10, "loss": 2.30, "accuracy_vgg11": 0.1, "client_ids": ""},
        {"round": 1, "accuracy": 0.55, "loss": 1.20, "accuracy_vgg11": 0.3, "client_ids": "0 1"},
        {"round": 2, "accuracy": None, "loss": None},                    # not evaluated this round
        {"round": 3, "accuracy": 0.50, "loss": 1.10, "accuracy_vgg11": 0.35}]


def test_final_best_and_round_of_best(tmp_path):
    (tmp_path / "metrics.csv").write_text("x")
    (tmp_path / "distilled.safetensors").write_bytes(b"x")
    (tmp_path / "tensorboard").mkdir()
    s = summarize(ROWS, title="t", wall_s=75.25, out_dir=tmp_path, info={"resumed after round": 1})
    assert s.metrics == [("accuracy", "0.5000", "0.5500", "1"), ("loss", "1.1000", "1.1000", "3"),
                         ("accuracy_vgg11", "0.3500", "0.3500", "3")]
    assert s.info == [("rounds", "3"), ("time", "1 min 15.2 s"), ("resumed after round", "1")]
    assert s.files == [("run folder", str(tmp_path)), ("metrics.csv", str(tmp_path / "metrics.csv")),
                       ("distilled.safetensors", str(tmp_path / "distilled.safetensors")),
                       ("tensorboard/", str(tmp_path / "tensorboard"))]


def test_ties_pick_the_earliest_round_and_empty_runs():
    s = summarize([{"round": 0, "accuracy": 0.5}, {"round": 1, "accuracy": 0.5}], title="t")
    assert s.metrics == [("accuracy", "0.5000", "0.5000", "0")] and s.files == []
    assert summarize([], title="t").metrics == []


@pytest.mark.parametrize("plain", [True, False])
def test_rendered_text_holds_every_entry(tmp_path, plain):
    pytest.importorskip("rich") if not plain else None
    text = render(summarize(ROWS, title="fedavg summary", wall_s=3.04, out_dir=tmp_path), plain=plain, width=120)
    for needle in ("fedavg summary", "accuracy", "0.5000", "0.5500", "best round", "loss", "1.1000", "3.0 s",
                   "run folder", str(tmp_path)):
        assert needle in text, (needle, text)
    assert "\x1b[" not in text  # no colour codes unless asked
    long = tmp_path / ("a-very-long-folder-name-" * 6) / "run[1]"
    text = render(summarize(ROWS, title="t", out_dir=long), plain=plain, width=60)
    assert str(long) in text  # whole, on one line, even in a narrow terminal


def test_format_seconds():
    assert [format_seconds(s) for s in (0.04, 59.96, 61, 3725)] == ["0.0 s", "1 min 0.0 s", "1 min 1.0 s", "1 h 02 min"]


def test_simulate_prints_the_summary(tmp_path):
    from fedlatent.cli import main

    out = tmp_path / "run"
    r = CliRunner().invoke(main, ["simulate", "--clients", "2", "--rounds", "1", "--model", "convnet:width=4",
                                  "--image-size", "8", "--out", str(out), "--quiet"])
    assert r.exit_code == 0, r.output
    assert "fedavg summary" in r.output and "best round" in r.output and str(out / "metrics.csv") in r.output
    final = r.output.split("final accuracy ")[1][:6]
    assert final in r.output.split("fedavg summary")[1]  # the table's final accuracy is the run's
