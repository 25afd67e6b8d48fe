"""Typed method configs: one dataclass per method, presets are instances, one option splitter, old paths."""
from __future__ import annotations

import dataclasses

import pytest
from click.testing import CliRunner

from fedlatent.fl.base import available_methods, get_method
from fedlatent.fl.options import coerce, describe, field_docs, make_config, option_names, split_options
from fedlatent.utils import FedLatentError


def test_every_method_with_options_has_a_documented_validated_config():
    for name in available_methods():
        cls = get_method(name)
        if cls.config_class is None:
            assert cls().options() == {}
            continue
        docs = field_docs(cls.config_class)
        names = [f.name for f in dataclasses.fields(cls.config_class)]
        assert set(names) == set(docs), (name, set(names) ^ set(docs))
        s = cls(cls.config_class())  # a config instance or keywords: the same strategy
        assert s.options() == cls().options()
        assert set(s.options()) <= set(names) == option_names(cls)


def test_make_config_overrides_a_preset_and_rejects_unknown_options():
    from fedlatent.fl.methods.feddgm import FedDGMConfig

    base = FedDGMConfig(ipc=2, iterations=5)
    c = make_config(FedDGMConfig, base, {"iterations": 7})
    assert (c.ipc, c.iterations, base.iterations) == (2, 7, 5)
    with pytest.raises(TypeError, match="no_such"):
        make_config(FedDGMConfig, base, {"no_such": 1})
    with pytest.raises(FedLatentError, match="ipc"):
        FedDGMConfig(ipc=0)


def test_split_and_coerce_follow_the_fields():
    from fedlatent.fl.methods.feddgm import FedDGM, FedDGMConfig

    cfg, meth = split_options(FedDGM, {"rounds": 2, "ipc": 3})
    assert cfg == {"rounds": 2} and meth == {"ipc": 3}
    with pytest.raises(FedLatentError, match="unknown option 'ipcc'"):
        split_options(FedDGM, {"ipcc": 3})
    assert coerce(FedDGMConfig, "ipc", "3") == 3 and coerce(FedDGMConfig, "batch_syn", "none") is None
    assert coerce(FedDGMConfig, "dsa", "false") is False and coerce(FedDGMConfig, "generator", "7") == "7"


def test_presets_are_config_instances_and_say_where_they_differ():
    from fedlatent.apps.distill import PRESETS
    from fedlatent.fl.methods.feddgm import FedDGMConfig

    cpu = PRESETS["cpu"]
    assert isinstance(cpu.method, FedDGMConfig)
    diff = cpu.differences()
    assert diff["method"]["ipc"] == 2 and "lr_w" not in diff["method"] and diff["config"]["clients"] == 5


def test_methods_command_lists_options_with_types_defaults_and_docs():
    from fedlatent.cli import main

    r = CliRunner().invoke(main, ["methods", "feddgm"])
    assert r.exit_code == 0, r.output
    assert "ipc : int = 10" in r.output and "reference: ``--ipc=10``" in r.output and "cpu:" in r.output
    rows = {row["name"]: row for row in describe(get_method("fedprox"))}
    assert rows["mu"]["default"] == 0.01 and "FedProx eq. 2" in rows["mu"]["doc"]
    assert CliRunner().invoke(main, ["methods"]).exit_code == 0


def test_old_module_paths_forward_patches_to_the_new_modules(monkeypatch):
    import fedlatent.fl.feddgm as old
    import fedlatent.fl.methods.feddgm as new

    real = new.local_train
    monkeypatch.setattr(old, "local_train", "patched")
    assert new.local_train == "patched"
    monkeypatch.undo()
    assert new.local_train is real and old.FedDGM is new.FedDGM


def test_fl_options_are_generated_from_the_config_fields_a_new_field_included():
    from dataclasses import dataclass

    import click

    from fedlatent.cli._options import _field_comments, fl_options, fl_values

    @dataclass
    class Cfg:
        rounds: int = 3               # communication rounds
        noise: float | None = None    # a new field: Gaussian noise multiplier
        audit: bool = False           # a new switch

    seen = {}

    @click.command()
    @fl_options(Cfg(), config_class=Cfg)
    def cmd(**kw):
        seen.update(kw)

    assert _field_comments(Cfg)["noise"] == "a new field: Gaussian noise multiplier"
    r = CliRunner().invoke(cmd, ["--noise", "1.5", "--audit"])
    assert r.exit_code == 0, r.output
    assert seen == {"rounds": 3, "noise": 1.5, "audit": True}
    assert "Gaussian noise multiplier" in CliRunner().invoke(cmd, ["--help"]).output
    from fedlatent.fl.base import FLConfig

    assert set(FLConfig.__dataclass_fields__) <= set(fl_values(dict.fromkeys(FLConfig.__dataclass_fields__, 1)))


def test_dash_o_means_one_thing_in_simulate_and_distill():
    from fedlatent.fl.methods.feddgm import FedDGM

    cfg, meth = split_options(FedDGM, {"momentum": 0.1, "method.momentum": 0.2, "fl.rounds": 1, "ipc": 2})
    assert cfg == {"momentum": 0.1, "rounds": 1} and meth == {"momentum": 0.2, "ipc": 2}
