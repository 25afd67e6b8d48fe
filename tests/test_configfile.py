"""--config FILE: TOML/JSON option files, precedence (command line > file > preset), unknown keys, and a run
folder's config.json replaying its run to identical metrics."""
from __future__ import annotations

import csv
import json

import pytest
from click.testing import CliRunner

from fedlatent.cli import main
from fedlatent.configfile import load_file, simulate_options
from fedlatent.utils import FedLatentError

SIM = ["simulate", "--clients", "3", "--rounds", "2", "--model", "convnet:width=4", "--image-size", "8",
       "--participation", "1", "--alpha", "0.3", "--lr", "0.05", "--method", "fedprox", "--mu", "0.05", "--quiet"]
DISTILL = ["distill", "--clients", "3", "--participation", "1", "--rounds", "2", "--local-epochs", "1",
           "--model", "convnet:width=8", "--surrogate", "convnet:width=8", "--ipc", "1", "--iterations", "1",
           "--syn-steps", "2", "--train-epochs", "1", "--seed", "5", "-O", "batch_size=64", "-O", "lr_img=50",
           "--no-progress"]


def _invoke(args):
    r = CliRunner().invoke(main, [str(a) for a in args])
    assert r.exit_code == 0, r.output
    return r


def _columns(path, names=("round", "accuracy", "loss")):
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    idx = [rows[0].index(n) for n in names]
    return [[r[i] for i in idx] for r in rows]


def _config(run):
    return json.loads((run / "config.json").read_text())


def test_simulate_config_json_replays_the_run(tmp_path):
    _invoke([*SIM, "--out", tmp_path / "a"])
    _invoke(["simulate", "--config", tmp_path / "a" / "config.json", "--out", tmp_path / "b", "--quiet"])
    assert _columns(tmp_path / "a" / "metrics.csv") == _columns(tmp_path / "b" / "metrics.csv")
    a, b = _config(tmp_path / "a"), _config(tmp_path / "b")
    assert a["config"] == b["config"] and a["method_options"] == b["method_options"] == {"mu": 0.05}


def test_distill_config_json_replays_the_run(tmp_path):
    _invoke([*DISTILL, "--out", tmp_path / "a"])
    _invoke(["distill", "--config", tmp_path / "a" / "config.json", "--out", tmp_path / "b", "--no-progress"])
    assert _columns(tmp_path / "a" / "metrics.csv") == _columns(tmp_path / "b" / "metrics.csv")
    assert _config(tmp_path / "a")["distill"] == _config(tmp_path / "b")["distill"]
    assert (tmp_path / "a" / "distilled.safetensors").read_bytes() == (tmp_path / "b" / "distilled.safetensors").read_bytes()


def test_precedence_command_line_over_file_over_preset(tmp_path):
    f = tmp_path / "run.toml"
    f.write_text('clients = 4\nrounds = 0\nalpha = 0.25\nlocal-epochs = 2\nseed = 7\n'
                 '[option]\nlr_img = 50.0\ntrain_batch = 64\npool = "all"\n')
    _invoke(["distill", "--config", f, "--seed", "3", "-O", "lr_img=20", "--out", tmp_path / "r", "--no-progress"])
    rec = _config(tmp_path / "r")["distill"]
    cfg, meth = rec["config"], rec["method_options"]
    assert cfg["seed"] == 3                                              # command line beats the file
    assert (cfg["clients"], cfg["alpha"], cfg["local_epochs"]) == (4, 0.25, 2)  # file beats the preset
    assert meth["lr_img"] == 20 and meth["train_batch"] == 64 and meth["pool"] == "all"  # -O merged, CLI key wins
    assert cfg["batch_size"] == 32 and meth["ipc"] == 2                  # the cpu preset where nobody said anything


def test_json_option_file_for_simulate(tmp_path):
    f = tmp_path / "o.json"
    f.write_text(json.dumps({"rounds": 0, "clients": 2, "image_size": 8, "model": "convnet:width=4",
                             "method": "fedprox", "method-option": {"mu": 0.5}}))
    _invoke(["simulate", "--config", f, "--out", tmp_path / "r", "--quiet"])
    cfg = _config(tmp_path / "r")
    assert cfg["config"]["clients"] == 2 and cfg["method_options"] == {"mu": 0.5}


@pytest.mark.parametrize("text, match", [
    ("rounds = 1\nrounds_per_client = 3\nlocal_epoch = 2\n", r"unknown key\(s\) 'local_epoch', 'rounds_per_client'; "
                                                            r"valid: .*alpha.*local-epochs.*rounds"),
    ("rounds = -1\n", r"rounds: -1 is not in the range x>=0"),
    ("partition = \"random\"\n", r"partition: 'random' is not one of"),
    ("rounds = [\n", r"not valid TOML"),
])
def test_bad_files_are_one_line_errors(tmp_path, text, match):
    f = tmp_path / "bad.toml"
    f.write_text(text)
    r = CliRunner().invoke(main, ["simulate", "--config", str(f), "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and r.output.count("\n") == 1, r.output
    import re

    assert re.search(match, r.output), r.output
    assert not (tmp_path / "x").exists()


def test_missing_file_and_unreplayable_config(tmp_path):
    with pytest.raises(FedLatentError, match="no such config file"):
        load_file(tmp_path / "nope.toml")
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(FedLatentError, match="holds a table"):
        load_file(tmp_path / "list.json")
    from fedlatent.fl.base import FLConfig

    from fedlatent.cli.simulate import simulate as simulate_cmd
    from fedlatent.configfile import option_index

    params = {p.name: p for p in option_index(simulate_cmd).values()}
    # every FLConfig field is an option of simulate now (generated from FLConfig), so a run that set norm_cap
    # replays through the command line; method options go through -O method.KEY exactly as recorded
    cfg = {"method": "fedavg", "versions": {}, "dataset_name": "digits", "method_options": {},
           "config": {**FLConfig().to_dict(), "norm_cap": 5.0}}
    assert simulate_options(cfg, params)["norm_cap"] == 5.0
    assert simulate_options({"rounds": 3}, params) is None  # a plain option file, not a run's config.json
    cfg["config"]["norm_cap"] = FLConfig().norm_cap
    cfg.update(data_root="some/folder", image_size_requested=12, method_options={"mu": 0.1, "beta": 2})
    assert simulate_options(cfg, params) | {"clients": 10} == {**FLConfig().to_dict(), "method": "fedavg",
        "dataset": "digits", "image_size": 12, "data_root": "some/folder",
        "option": {"method.mu": 0.1, "method.beta": 2}}
