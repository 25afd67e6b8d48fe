"""FedDGM: batched == looped distillation, the strategy's screening and errors, end-to-end run folder, CLI."""
from __future__ import annotations

import json

import pytest
import torch

from fedlatent.utils import FedLatentError

TINY = dict(clients=2, participation=1.0, rounds=2, local_epochs=1, batch_size=64, model="convnet:width=8",
            surrogate="convnet:width=8", ipc=1, iterations=2, syn_steps=2, train_epochs=1, seed=3)


def _ctx(digits16, **cfg):
    from fedlatent.fl.base import FLConfig, FLContext

    c = FLConfig(**{"model": "convnet:width=8", "seed": 0, **cfg}).check()
    return FLContext(config=c, num_classes=10, channels=1, image_size=16, class_names=list(digits16.classes),
                     client_sizes=[100] * c.clients, mean=tuple(digits16.mean), std=tuple(digits16.std))


def _uploads(strategy, n: int, scale: float = 0.02):
    from fedlatent.fl.base import Upload

    start = strategy.client_payload(1, 0)["params"]
    out = []
    for cid in range(n):
        g = torch.Generator().manual_seed(100 + cid)
        end = start + scale * torch.randn(start.shape, generator=g)
        out.append(Upload(cid, {"start": start.clone(), "end": end}, 50))
    return out


# -- batched == looped ---------------------------------------------------------------------------------
def test_batched_meta_gradient_equals_engine_per_problem_float64():
    """vmap over clients computes exactly the engine's exact-mode meta-gradient of every client (DSA on)."""
    from fedlatent.distill.augment import DSA
    from fedlatent.distill.mtt import make_plan, meta_gradient
    from fedlatent.fl.feddgm import batched_meta_gradient
    from fedlatent.models import get_model
    from fedlatent.models.functional import FlatModel

    torch.manual_seed(0)
    model = get_model("convnet:width=6", 1, 10, 16).double()
    flat = FlatModel(model)
    K, N = 3, 10
    th0 = flat.flatten().double()
    starts = torch.stack([th0 + 0.01 * torch.randn_like(th0) for _ in range(K)])
    ends = starts + 0.05 * torch.randn_like(starts)
    imgs = torch.randn(K, N, 1, 16, 16, dtype=torch.float64)
    labels = torch.arange(10).repeat(K, 1)
    log_lr = torch.log(torch.tensor([0.01, 0.02, 0.005], dtype=torch.float64))
    aug = DSA(siamese=False)
    plans = [make_plan(N, 3, 4, seed=10 + k) for k in range(K)]
    res = batched_meta_gradient(flat, starts, ends, imgs, labels, log_lr, plans, aug)
    for k in range(K):
        ref = meta_gradient(flat, starts[k], ends[k], imgs[k], labels[k], log_lr[k], plans[k], aug, mode="exact")
        assert abs(res[k].loss - ref.loss) < 1e-12
        assert torch.allclose(res[k].grad_images, ref.grad_images, rtol=1e-9, atol=1e-13)
        assert torch.allclose(res[k].grad_log_lr, ref.grad_log_lr, rtol=1e-9, atol=1e-13)
        assert torch.allclose(res[k].theta_end, ref.theta_end, rtol=1e-10, atol=1e-13)
        assert ref.grad_images.abs().max() > 0  # a real gradient, not zeros on both sides


def test_batched_distillation_identical_to_loop_through_the_strategy(digits16):
    """Two FedDGM iterations of 3 clients in F2 latent space: batched (vmap) and looped give the same latents."""
    from fedlatent.fl.feddgm import FedDGM, distill_clients

    outs = []
    for batched in (False, True):
        s = FedDGM(generator="digits", space="F2", ipc=1, iterations=2, syn_steps=3, surrogate="convnet:width=8",
                   train_epochs=0, progress=False, save_artifacts=False, batched=batched)
        s.setup(_ctx(digits16, clients=3))
        ups = _uploads(s, 3)
        ds = s.make_distillers(1, ups)
        runs, bsz = distill_clients(ds, [0, 1, 2], 2, batched=batched, max_batch=2, progress=False)
        assert bsz == (2 if batched else 1)
        outs.append(([torch.cat([p.detach().flatten() for p in d.synthetic.parameters()]) for d in ds],
                     [r.losses for r in runs], [d.lr for d in ds]))
    (p0, l0, lr0), (p1, l1, lr1) = outs
    for a, b in zip(p0, p1):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5), (a - b).abs().max()
    for a, b in zip(l0, l1):
        assert len(a) == len(b) == 2 and all(abs(x - y) < 1e-5 * max(1.0, abs(x)) for x, y in zip(a, b))
    assert all(abs(a - b) < 1e-6 * a for a, b in zip(lr0, lr1))
    # the latents actually moved
    s = FedDGM(generator="digits", space="F2", ipc=1, surrogate="convnet:width=8", progress=False)
    s.setup(_ctx(digits16, clients=3))
    fresh = s.make_distillers(1, _uploads(s, 3))
    assert not torch.allclose(torch.cat([p.flatten() for p in fresh[0].synthetic.parameters()]), p0[0])


def test_concurrent_clients_are_bitwise_the_one_thread_loop(digits16):
    """batched="threads": the clients in worker threads of one intra-op thread each give bitwise the latents,
    losses and lrs of the loop run on one thread, in any order; the caller's thread count is restored."""
    from fedlatent.distill.batched import concurrent_workers
    from fedlatent.fl.feddgm import FedDGM, distill_clients

    threads = torch.get_num_threads()
    outs = []
    try:
        for batched, n in ((False, 1), ("threads", 3)):
            torch.set_num_threads(n)
            s = FedDGM(generator="digits", space="F2", ipc=1, iterations=2, syn_steps=3, surrogate="convnet:width=8",
                       train_epochs=0, progress=False, save_artifacts=False, batched=batched)
            s.setup(_ctx(digits16, clients=4))
            ds = s.make_distillers(1, _uploads(s, 4))
            runs, workers = distill_clients(ds, [0, 1, 2, 3], 2, batched=batched, progress=False)
            assert workers == (1 if batched is False else 3) and torch.get_num_threads() == n
            outs.append(([torch.cat([p.detach().flatten() for p in d.synthetic.parameters()]) for d in ds],
                         [r.losses for r in runs], [d.lr for d in ds]))
    finally:
        torch.set_num_threads(threads)
    (p0, l0, lr0), (p1, l1, lr1) = outs
    assert all(torch.equal(a, b) for a, b in zip(p0, p1))
    assert l0 == l1 and lr0 == lr1 and all(len(x) == 2 for x in l0)
    assert not torch.equal(p0[0], p0[1])  # the clients' sets differ: a worker did not repeat one client
    assert concurrent_workers(10, "cpu") == min(10, threads) and concurrent_workers(10, "meta") == 1


def test_auto_distils_clients_in_threads_on_a_cpu_and_grouped_on_cuda(digits16, monkeypatch):
    """batched='auto': the grouped batch on CUDA, the clients side by side in threads on a CPU (the loop where it
    cannot: one intra-op thread, or memory for only one client at a time); the grouped batch falls back to the
    loop for the unrolled meta-gradient and soft labels, the threads do not need to."""
    from fedlatent.distill import batched as B
    from fedlatent.fl.feddgm import FedDGM, distill_clients

    s = FedDGM(generator="digits", space="F2", ipc=1, iterations=1, syn_steps=2, surrogate="convnet:width=8",
               train_epochs=0, progress=False, save_artifacts=False)
    s.setup(_ctx(digits16, clients=3))
    assert s._use_batched() == "threads"
    s.mtt_mode = "unrolled"
    assert s._use_batched() == "threads"
    cpu, s.ctx.device = s.ctx.device, "cuda:0"
    assert s._use_batched() is False
    s.mtt_mode = "exact"
    assert s._use_batched() is True
    s.ctx.device = cpu
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        ds = s.make_distillers(1, _uploads(s, 3))
        assert distill_clients(ds, [0, 1, 2], 1, batched="threads", progress=False)[1] == 2
        monkeypatch.setattr(B, "available_bytes", lambda dev: B._distiller_bytes(ds[0]) + 1)  # room for one
        assert distill_clients(ds, [0, 1, 2], 1, batched="threads", progress=False)[1] == 1
        torch.set_num_threads(1)
        assert distill_clients(ds, [0, 1, 2], 1, batched="threads", progress=False)[1] == 1
    finally:
        torch.set_num_threads(threads)


def test_distill_clients_rejects_an_unknown_mode():
    from fedlatent.errors import FedLatentError
    from fedlatent.fl.feddgm import distill_clients

    with pytest.raises(FedLatentError, match="batched must be"):
        distill_clients([], [], 1, batched="sometimes")


def test_a_diverging_client_stops_alone_in_both_modes(digits16):
    """A client whose update turns non-finite keeps its last good set and stops; the others go on (loop == batch
    == threads)."""
    from fedlatent.fl.feddgm import FedDGM, distill_clients

    outs = []
    for batched in (False, True, "threads"):
        s = FedDGM(generator="digits", space="F2", ipc=1, syn_steps=2, surrogate="convnet:width=8", progress=False,
                   save_artifacts=False)
        s.setup(_ctx(digits16, clients=3))
        ds = s.make_distillers(1, _uploads(s, 3))
        for g in ds[1].opt_img.param_groups:  # client 1 explodes on its first update
            g["lr"] = float("inf")
        before = [p.detach().clone() for p in ds[1].synthetic.parameters()]
        runs, _ = distill_clients(ds, [0, 1, 2], 2, batched=batched, progress=False)
        assert runs[1].failure is not None and "non-finite" in runs[1].failure and runs[1].losses == []
        assert all(torch.equal(a, b) for a, b in zip(before, ds[1].synthetic.parameters()))  # restored
        assert runs[0].failure is None and runs[2].failure is None and len(runs[0].losses) == len(runs[2].losses) == 2
        outs.append(torch.cat([p.detach().flatten() for p in ds[2].synthetic.parameters()]))
    assert all(torch.allclose(outs[0], o, rtol=1e-4, atol=1e-5) for o in outs[1:])


def test_sets_rendering_to_nan_are_dropped_from_the_pool(digits16):
    """Finite but huge latents render to inf images: the client's next iteration stops it and aggregate drops
    its set instead of training the global model on it."""
    from fedlatent.fl.feddgm import FedDGM

    s = FedDGM(generator="digits", space="F2", ipc=1, iterations=2, syn_steps=2, surrogate="convnet:width=8",
               train_epochs=1, progress=False, save_artifacts=False)
    s.setup(_ctx(digits16))
    ups = _uploads(s, 2)
    orig = s.make_distillers

    def sabotaged(rnd, uploads):
        ds = orig(rnd, uploads)
        for g in ds[0].opt_img.param_groups:
            g["lr"] = 1e38
        return ds

    s.make_distillers = sabotaged
    m = s.aggregate(1, ups)
    assert m["distill_failed"] == 1.0 and m["distill_dropped"] == 1.0 and m["pool_size"] == 10.0
    assert set(s.pool.clients.tolist()) == {1} and torch.isfinite(s.pool.images).all()
    assert all(torch.isfinite(p).all() for p in s.model.parameters())


def test_batch_size_comes_from_memory():
    from fedlatent.fl.feddgm import choose_batch, client_bytes
    from fedlatent.models import get_model
    from fedlatent.models.functional import FlatModel

    flat = FlatModel(get_model("convnet:width=8", 1, 10, 16))
    per = client_bytes(flat, 20, 20, 5, (1, 16, 16))
    assert per > 4 * 20 * 16 * 16 * 3  # at least the images, their gradient and the augmented batch
    bigger = client_bytes(flat, 20, 20, 10, (1, 16, 16))
    assert bigger > per  # more steps store more theta_n / g_n
    assert choose_batch(10, per, 3 * per) == 3
    assert choose_batch(10, per, per // 2) == 1
    assert choose_batch(10, per, 100 * per) == 10
    assert choose_batch(10, per, 100 * per, max_batch=4) == 4


# -- strategy contract ------------------------------------------------------------------------------------
def test_uploads_are_start_and_end_only_and_screened(digits16):
    from fedlatent.fl.base import ClientData, Upload
    from fedlatent.fl.feddgm import FedDGM
    from fedlatent.fl.validate import check_upload

    s = FedDGM(generator="digits", space="F2", ipc=1, surrogate="convnet:width=8", progress=False)
    ctx = _ctx(digits16)
    s.setup(ctx)
    payload = s.client_payload(1, 0)
    assert set(payload) == {"params"}
    data = ClientData(0, digits16.x_train[:40], digits16.y_train[:40])
    up = s.client_update(ctx, 1, 0, payload, data)
    spec = s.expected_upload(0)
    assert set(up.tensors) == {"start", "end"} and check_upload(up, 0, spec) is None
    assert torch.equal(up.tensors["start"], payload["params"]) and not torch.equal(up.tensors["end"], payload["params"])
    nan = dict(up.tensors, end=up.tensors["end"].clone())
    nan["end"][0] = float("nan")
    assert "NaN" in check_upload(Upload(0, nan, 40), 0, spec)
    short = dict(up.tensors, end=up.tensors["end"][:-1])
    assert "shape" in check_upload(Upload(0, short, 40), 0, spec)
    extra = dict(up.tensors, data=digits16.x_train[:2])
    assert "unexpected" in check_upload(Upload(0, extra, 40), 0, spec)


def test_aggregate_drops_a_forged_start(digits16):
    from fedlatent.fl.feddgm import FedDGM

    s = FedDGM(generator="digits", space="F2", ipc=1, iterations=1, syn_steps=2, surrogate="convnet:width=8",
               train_epochs=1, progress=False, save_artifacts=False)
    s.setup(_ctx(digits16))
    ups = _uploads(s, 2)
    ups[1].tensors["start"] = ups[1].tensors["start"] + 1.0
    before = {k: v.clone() for k, v in s.model.state_dict().items()}
    m = s.aggregate(1, ups)
    assert m["start_mismatch"] == 1.0 and m["pool_size"] == 10.0
    assert set(s.pool.clients.tolist()) == {0}
    assert any(not torch.equal(before[k], v) for k, v in s.model.state_dict().items())  # trained on the pool


@pytest.mark.parametrize("kw, match", [
    (dict(surrogate="foonet"), "unknown architecture"),
    (dict(generator="no-such-generator"), "unknown generator"),
    (dict(generator="/tmp/definitely/missing.safetensors"), "does not exist|missing|unknown"),
    (dict(surrogate="convnet:width=8,norm=batchnorm"), "buffers"),
    (dict(space="F99"), "F99|layer|k"),
])
def test_setup_errors_are_clear(digits16, kw, match):
    from fedlatent.fl.feddgm import FedDGM

    args = dict(generator="digits", space="F2", ipc=1, surrogate="convnet:width=8", progress=False)
    args.update(kw)
    with pytest.raises(FedLatentError, match=match):
        FedDGM(**args).setup(_ctx(digits16))


@pytest.mark.parametrize("kw", [dict(ipc=0), dict(syn_steps=0), dict(lr_img=-1.0), dict(pool="everything"),
                                dict(batched="sometimes"), dict(classes="present"), dict(space="Z3"),
                                dict(mtt_engine="turbo"), dict(render_engine="turbo"), dict(train_engine="turbo"),
                                dict(client_engine="turbo")])
def test_bad_options(kw):
    from fedlatent.fl.feddgm import FedDGM

    with pytest.raises(FedLatentError):
        FedDGM(**kw)


def test_mtt_engine_reaches_the_distillers(digits16):
    """``mtt_engine`` is the engine of every client's MTT: bf16 convolutions give close, not identical, latents."""
    from fedlatent.fl.feddgm import FedDGM, distill_clients

    outs = []
    for engine in ("auto", "convnet", "convnet-bf16"):
        s = FedDGM(generator="digits", space="F2", ipc=1, iterations=2, syn_steps=3, surrogate="convnet:width=8",
                   train_epochs=0, progress=False, save_artifacts=False, batched=False, mtt_engine=engine)
        s.setup(_ctx(digits16, clients=2))
        ds = s.make_distillers(1, _uploads(s, 2))
        assert all(d.config.engine == engine for d in ds)
        distill_clients(ds, [0, 1], 2, batched=False, progress=False)
        outs.append(torch.cat([p.detach().flatten() for p in ds[0].synthetic.parameters()]))
    assert torch.equal(outs[0], outs[1])  # auto is the fp32 ConvNet kernel
    assert not torch.equal(outs[1], outs[2]) and torch.allclose(outs[1], outs[2], rtol=0.05, atol=0.05)


def test_render_and_train_engines_reach_the_sets_and_the_server_training(digits16, monkeypatch):
    """render_engine: 'compiled' compiles every client's LatentSet, 'fast' only where the fast MTT engine compiles
    (compiling.usable_on), 'eager' never; train_engine is the engine of the server training's fit_on_set,
    client_engine that of the clients' local_train."""
    from fedlatent import compiling
    from fedlatent.fl.methods import feddgm

    seen, clients = [], []
    real, real_local = feddgm.fit_on_set, feddgm.local_train
    monkeypatch.setattr(feddgm, "fit_on_set", lambda *a, **kw: seen.append(kw["engine"]) or real(*a, **kw))
    monkeypatch.setattr(feddgm, "local_train", lambda *a, **kw: clients.append(kw["engine"]) or real_local(*a, **kw))
    monkeypatch.setattr(compiling, "compile_unavailable", lambda: None)
    for render, usable, want in (("eager", True, False), ("compiled", False, True), ("fast", True, True),
                                 ("fast", False, False)):
        monkeypatch.setattr(compiling, "usable_on", lambda device, u=usable: u)
        s = feddgm.FedDGM(generator="digits", space="F2", ipc=1, iterations=1, syn_steps=2, surrogate="convnet:width=8",
                          train_epochs=1, progress=False, save_artifacts=False, batched=False, render_engine=render,
                          train_engine="convnet")
        s.setup(_ctx(digits16, clients=2))
        ds = s.make_distillers(1, _uploads(s, 2))
        assert all(d.synthetic.compile is want for d in ds), (render, usable)
    s._distil_and_train(1, _uploads(s, 2), {})  # 'fast' without a compiler: renders eagerly, trains on the pool
    assert seen == ["convnet"]  # global model = surrogate here: one fit_on_set
    s.client_engine = "convnet-bf16"
    from fedlatent.fl.base import ClientData

    s.client_update(s.ctx, 1, 0, s.client_payload(1, 0), ClientData(0, digits16.x_train[:40], digits16.y_train[:40]))
    assert clients == ["convnet-bf16"]


# -- end to end ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from fedlatent.fl.feddgm import distill_federated

    out = tmp_path_factory.mktemp("feddgm") / "run"
    res = distill_federated(out=out, progress=False, **TINY)
    return out, res


def test_end_to_end_writes_the_run_folder(tiny_run):
    from fedlatent.export import load_distilled
    from fedlatent.fl.run import read_metrics

    out, res = tiny_run
    for name in ("config.json", "metrics.csv", "accuracy.png", "grid_round1.png", "grid_round2.png",
                 "distilled.safetensors", "report.md", "summary.json", "checkpoints/latest.json"):
        assert (out / name).is_file(), name
    rows = read_metrics(out / "metrics.csv")
    assert [int(r["round"]) for r in rows] == [0, 1, 2]
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in rows)
    assert rows[2]["pool_size"] == 20 and rows[2]["distill_failed"] == 0
    ds, meta = load_distilled(out / "distilled.safetensors")
    assert len(ds) == 2 * 10 and sorted(set(ds.clients.tolist())) == [0, 1] and set(ds.rounds.tolist()) == {2}
    assert meta["generator"] == "digits" and len(meta["generator_sha256"]) == 64 and meta["latent_space"] == "F2"
    assert ds.latents["ws"].shape[:2] == (20, 7) and ds.latents["f_k"].shape[0] == 20
    cfg = json.loads((out / "config.json").read_text())
    ps = cfg["generator_public_split"]
    assert ps["excluded"] == 269 and sum(json.loads((out / "summary.json").read_text())["client_sizes"]) == 1347 - 269
    report = (out / "report.md").read_text()
    assert "Global model accuracy" in report and "| 2 |" in report
    assert res.final_accuracy == rows[-1]["accuracy"]


def test_run_folder_names_the_callers_data(digits16, tmp_path):
    """Data passed from Python: config.json and report.md name that data set, not the ``dataset`` default."""
    import dataclasses

    from fedlatent.fl.feddgm import distill_federated

    mine = dataclasses.replace(digits16, name="my-digits")
    distill_federated(data=mine, generator="digits", out=tmp_path / "r", progress=False, **{**TINY, "rounds": 0})
    assert json.loads((tmp_path / "r" / "config.json").read_text())["distill"]["dataset"] == "my-digits"
    assert "dataset: `my-digits`" in (tmp_path / "r" / "report.md").read_text()


def test_clients_never_hold_the_generators_public_split(digits16):
    """The digits generator was trained on a public split; FedDGM's clients get exactly the complement."""
    from fedlatent.fl.feddgm import private_training_data
    from fedlatent.generators.train import public_split_indices

    priv, info = private_training_data(digits16, "digits")
    pub = public_split_indices(len(digits16.y_train), info["fraction"], info["seed"])
    assert len(priv.y_train) + len(pub) == len(digits16.y_train)
    # no public image is among the private ones
    pub_x = digits16.x_train[torch.from_numpy(pub)].flatten(1)
    d = torch.cdist(pub_x[:50], priv.x_train.flatten(1)).min()
    assert d > 0


def test_cli_distill_export_eval(tiny_run, tmp_path):
    from click.testing import CliRunner

    from fedlatent.cli import main
    from fedlatent.export import load_distilled

    out, _ = tiny_run
    runner = CliRunner()
    r = runner.invoke(main, ["export", str(out), "--out", str(tmp_path / "e.safetensors"), "--uint8"])
    assert r.exit_code == 0, r.output
    ds, meta = load_distilled(tmp_path / "e.safetensors")
    assert meta["image_encoding"] == "uint8" and len(ds) == 20
    r = runner.invoke(main, ["eval", str(tmp_path / "e.safetensors"), "--arch", "convnet:width=8", "--epochs", "2",
                             "--seeds", "0,1", "--max-test", "100", "--no-progress"])
    assert r.exit_code == 0, r.output
    assert "convnet:width=8" in r.output and "+-" in r.output
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 100)
    r = runner.invoke(main, ["eval", str(bad)])
    assert r.exit_code == 2 and "error:" in r.output
    r = runner.invoke(main, ["eval", str(tmp_path / "e.safetensors"), "--arch", "foonet", "--epochs", "1"])
    assert r.exit_code == 2 and "unknown architecture" in r.output
    args = ["distill", "--out", str(tmp_path / "cli"), "--no-progress", "--clients", "2", "--rounds", "1",
            "--local-epochs", "1", "--ipc", "1", "--iterations", "1", "--syn-steps", "2", "--train-epochs", "1",
            "--surrogate", "convnet:width=8", "--model", "convnet:width=8", "--looped", "-O", "batch_size=64"]
    r = runner.invoke(main, args)
    assert r.exit_code == 0, r.output
    assert any(line.startswith("feddgm: final accuracy") for line in r.output.splitlines())
    assert "feddgm summary" in r.output and str(tmp_path / "cli" / "distilled.safetensors") in r.output
    assert (tmp_path / "cli" / "distilled.safetensors").is_file()
    r = runner.invoke(main, ["distill", "--out", str(tmp_path / "x"), "--generator", "nope", "--no-progress"])
    assert r.exit_code == 2 and "unknown generator" in r.output


def test_given_partitions_follow_the_public_split_exclusion():
    """Partitions handed over with the data index the full training set; dropping the generator's public split
    renumbers them to the kept images and leaves the public ones out (no stale indices)."""
    import numpy as np

    from fedlatent.apps.distill import private_training_data
    from fedlatent.data import load_dataset
    from fedlatent.data.hf import PARTITIONS_KEY

    data = load_dataset("digits", resize=16)
    n = len(data.y_train)
    parts = [np.arange(0, n, 2), np.arange(1, n, 2)]
    data.extra[PARTITIONS_KEY] = parts
    out, info = private_training_data(data, "digits")
    assert info["excluded"] > 0
    new = out.extra[PARTITIONS_KEY]
    assert sum(len(p) for p in new) == len(out.y_train)
    assert sorted(np.concatenate(new).tolist()) == list(range(len(out.y_train)))
    from fedlatent.generators.train import private_split_indices

    keep = private_split_indices(n, float(info["fraction"]), int(info["seed"]))
    pos = {int(k): j for j, k in enumerate(keep)}
    for old, p in zip(parts, new):  # the same images, in the kept set's numbering
        assert p.tolist() == [pos[int(i)] for i in old if int(i) in pos]
        kept_old = torch.tensor([int(i) for i in old if int(i) in pos])
        assert torch.equal(out.x_train[torch.from_numpy(p)], data.x_train[kept_old])
