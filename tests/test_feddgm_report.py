"""The FedDGM grid report (``benchmarks/_feddgm_report.py``): merging grid parts and the acceptance margins."""
import importlib.util
import json
from pathlib import Path

import pytest

_SPEC = importlib.util.spec_from_file_location(
    "_feddgm_report", Path(__file__).resolve().parents[1] / "benchmarks" / "_feddgm_report.py")
report = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(report)


def _bench():
    """benchmarks/feddgm.py as a module (loaded once, on first use)."""
    if "bench" not in _bench.__dict__:
        spec = importlib.util.spec_from_file_location(
            "_feddgm_bench", Path(__file__).resolve().parents[1] / "benchmarks" / "feddgm.py")
        _bench.bench = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(_bench.bench)
    return _bench.bench


def _run(method, seed, final, alpha=0.01, premise=None):
    return {"dataset": "d", "alpha": alpha, "seed": seed, "method": method, "final": final, "last3": final,
            "curve": [[1, final]], "premise": premise}


def _premise(a, b, c):
    return {"distilled": {"mean": a}, "initial": {"mean": b}, "real": {"mean": c}, "n_images": 20,
            "f_move": 0.1, "loss_first": 1.0, "loss_last": 0.5}


def test_targets_margins_per_seed_and_on_the_mean():
    runs = [_run("fedavg", 0, 0.20), _run("fedavg", 1, 0.30), _run("feddgm", 0, 0.31, premise=_premise(.3, .2, .4)),
            _run("feddgm", 1, 0.40, premise=_premise(.5, .4, .4)),
            _run("fedavg", 0, 0.50, 0.1), _run("fedavg-m", 0, 0.60, 0.1), _run("dynafed", 0, 0.55, 0.1),
            _run("fedavg", 1, 0.50, 0.1), _run("fedavg-m", 1, 0.40, 0.1), _run("dynafed", 1, 0.45, 0.1),
            _run("hyb", 0, 0.58, 0.1), _run("hyb", 1, 0.52, 0.1)]
    rows = {r["alpha"]: r for r in report.targets(runs, hybrid="hyb")}
    t = rows[0.01]["feddgm_minus_fedavg"]
    assert t["per_seed"] == pytest.approx([11.0, 10.0]) and t["mean"] == pytest.approx(10.5) and t["met"]
    assert rows[0.01]["premise"]["vs_initial"] == pytest.approx(10.0)
    assert rows[0.01]["premise"]["vs_real"] == pytest.approx(0.0)
    h = rows[0.1]["hybrid_minus_best_baseline"]
    # per seed against that seed's best baseline (-2 on seed 0, +2 on seed 1); on the mean against the best mean (50)
    assert h["per_seed"] == pytest.approx([-2.0, 2.0]) and h["mean"] == pytest.approx(5.0)
    assert not h["met_every_seed"] and "feddgm_minus_fedavg" not in rows[0.1]


def test_premise_rounds_pool_the_paired_gaps_of_every_seed_per_round(tmp_path, capsys):
    """The per-round premise: round k's gaps are every run's round-k pairs; the summary over every round is their
    union; the end-of-run premise's pairs are (a) - (b) per training seed."""
    def rounds(*gaps):  # each pair as (a) = 0.5 + gap, (b) = 0.5, the way a record holds them
        return [{"round": k + 1, "gaps": list(g), "distilled": {"accs": [0.5 + x for x in g]},
                 "initial": {"accs": [0.5] * len(g)}} for k, g in enumerate(gaps)]

    p0 = {**_premise(.3, .2, .4), "distilled": {"mean": .3, "accs": [.31, .29]},
          "initial": {"mean": .2, "accs": [.30, .10]}}
    runs = [{**_run("feddgm", 0, 0.3, premise=p0), "premise_rounds": rounds((.01, .03), (-.02, .00))},
            {**_run("feddgm", 1, 0.3), "premise_rounds": rounds((.02, .02), (.04, -.01))}, _run("fedavg", 0, 0.2)]
    (row,) = report.premise_rounds(runs)
    assert row["seeds"] == [0, 1] and [r["round"] for r in row["rounds"]] == [1, 2]
    assert row["rounds"][0]["mean"] == pytest.approx(2.0) and row["rounds"][0]["above_0"] == 4
    assert row["rounds"][1]["mean"] == pytest.approx(0.25) and row["rounds"][1]["above_0"] == 1
    assert row["mean"] == pytest.approx(1.125) and row["n"] == 8 and row["above_0"] == 5
    assert row["std"] == pytest.approx(float(__import__("numpy").std([1, 3, 2, 2, -2, 0, 4, -1], ddof=1)))
    t = report.targets(runs)[0]["premise"]
    assert t["vs_initial_pairs"] == pytest.approx([1.0, 19.0]) and t["pairs_above_0"] == 2
    png = tmp_path / "r.png"
    report.plot_premise_rounds(runs, png)
    assert png.stat().st_size > 0


def test_collect_later_folder_wins_and_main_writes_json(tmp_path, capsys):
    for folder, final in (("a", 0.1), ("b", 0.2)):
        d = tmp_path / folder / "d-a0.01-s0-fedavg"
        d.mkdir(parents=True)
        (d / "record.json").write_text(json.dumps(_run("fedavg", 0, final)))
    assert [r["final"] for r in report.collect([tmp_path / "a", tmp_path / "b"])] == [0.2]
    out = tmp_path / "m.json"
    assert report.main([str(tmp_path / "a"), str(tmp_path / "b"), "--json", str(out)]) == 0
    assert json.loads(out.read_text())["runs"][0]["final"] == 0.2
    assert report.main([str(tmp_path / "empty")]) == 2


def test_markdown_uses_the_sample_std_over_seeds():
    md = report.markdown([_run("fedavg", 0, 0.20), _run("fedavg", 1, 0.30), _run("fedavg", 0, 0.5, 0.1)])
    assert "| fedavg | 25.00 ± 7.07 (2) | 50.00 (1) |" in md  # ddof 1: |0.2 - 0.3| / sqrt(2)


def test_skip_existing_keeps_a_run_from_before_an_option_existed():
    """benchmarks/feddgm.py --skip-existing: an option missing from the record counts as equal only at its default;
    any other difference (a changed value, a non-default new option, the FL config) is a rerun."""
    bench = _bench()
    old = {"config": {"seed": 0, "alpha": 0.01}, "method_options": {"lr_img": 30.0, "ipc": 2}}
    now = {"config": {"seed": 0, "alpha": 0.01}, "method_options": {"lr_img": 30.0, "ipc": 2,
                                                                    "train_schedule": "constant"}}
    assert bench.same_settings(old, now)
    assert not bench.same_settings(old, {**now, "method_options": {**now["method_options"], "train_schedule": "cosine"}})
    assert not bench.same_settings(old, {**now, "method_options": {**now["method_options"], "lr_img": 10.0}})
    assert not bench.same_settings(old, {**now, "config": {"seed": 1, "alpha": 0.01}})
    assert not bench.same_settings(None, now)
    assert bench.same_settings({"config": {"seed": 0}, "method_options": None}, {"config": {"seed": 0},
                                                                                "method_options": None})


def test_skip_existing_knows_the_generator_file_behind_a_name(tmp_path):
    """generator_sha: the manifest entry's sha256 for a name, the file's for a path, None without a generator file."""
    import hashlib

    from fedlatent.generators.registry import read_manifest

    bench = _bench()
    assert bench.generator_sha({"generator": "digits"}) == read_manifest()["models"]["digits"]["sha256"]
    f = tmp_path / "g.safetensors"
    f.write_bytes(b"not a checkpoint, only bytes")
    assert bench.generator_sha({"generator": str(f)}) == hashlib.sha256(f.read_bytes()).hexdigest()
    assert bench.generator_sha(None) is None and bench.generator_sha({"generator": None}) is None
    assert bench.generator_sha({"generator": "random:width=8"}) is None


def test_premise_seeds_keep_the_run_seed_first_and_reject_zero(capsys):
    bench = _bench()
    assert bench.premise_seeds(3, 1) == (3,)  # one seed: the check the earlier records ran
    assert bench.premise_seeds(1, 3) == (1, 1001, 2001)
    assert bench.parse_args(["--premise-seeds", "2"]).premise_seeds == 2
    with pytest.raises(SystemExit) as exc:
        bench.parse_args(["--premise-seeds", "0"])
    assert exc.value.code == 2 and "at least 1" in capsys.readouterr().err


def test_rerun_reason_names_settings_before_the_generator_file():
    bench = _bench()
    settings = ({"seed": 0}, {"generator": "cifar10", "lr_img": 30.0})
    rec = {"settings": {"config": {"seed": 0}, "method_options": {"generator": "cifar10", "lr_img": 30.0}},
           "generator_sha256": "aa"}
    assert bench.rerun_reason(rec, settings, "aa") is None
    assert bench.rerun_reason(rec, settings, None) is None  # no generator file: the settings decide
    assert "generator" in bench.rerun_reason(rec, settings, "bb")
    assert "generator" in bench.rerun_reason({k: v for k, v in rec.items() if k != "generator_sha256"}, settings, "aa")
    assert bench.rerun_reason(rec, ({"seed": 1}, settings[1]), "aa") == "other settings"


def test_premise_every_round_ends_at_the_runs_own_premise(tmp_path):
    """--premise-every-round: one check per round, paired per training seed; the last round's is the end-of-run
    check of the same pool with the same seeds, so its (a) and (b) are the record's premise to the bit; and the
    checks leave the run itself as it is without them (the same curve, the same pool)."""
    bench = _bench()
    args = ["--datasets", "digits", "--alphas", "0.5", "--seeds", "0", "--rounds", "2", "--clients", "2",
            "--train-subsample", "200", "--test-subsample", "100", "--model", "convnet:width=8",
            "-O", "surrogate=\"convnet:width=8\"", "-O", "iterations=1", "-O", "syn_steps=2", "-O", "ipc=1",
            "-O", "train_epochs=1", "--premise-epochs", "2", "--premise-seeds", "2", "--eval-archs", "",
            "--methods", "feddgm"]
    out, plain = tmp_path / "g", tmp_path / "plain"
    assert bench.main(args + ["--premise-every-round", "--out", str(out)]) == 0
    assert bench.main(args + ["--out", str(plain)]) == 0
    run = next(out.glob("*-feddgm"))
    rec = json.loads((run / "record.json").read_text())
    base = json.loads((next(plain.glob("*-feddgm")) / "record.json").read_text())
    assert rec["curve"] == base["curve"] and rec["premise"]["distilled"] == base["premise"]["distilled"]
    rows = rec["premise_rounds"]
    assert [r["round"] for r in rows] == [1, 2] and all(len(r["gaps"]) == 2 for r in rows)
    assert rows[-1]["distilled"]["accs"] == rec["premise"]["distilled"]["accs"]
    assert rows[-1]["initial"]["accs"] == rec["premise"]["initial"]["accs"]
    assert rows[-1]["gaps"] == [d - i for d, i in zip(rec["premise"]["distilled"]["accs"],
                                                        rec["premise"]["initial"]["accs"])]
    assert [r["accuracy"] for r in rows] == [acc for _, acc in rec["curve"][1:]]
    assert (run / "premise_rounds.png").stat().st_size > 0
