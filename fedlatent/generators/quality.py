"""Offline quality of a class-conditional generator, each metric next to its real-vs-real ceiling.

All metrics but GAN-train live in the feature space of a classifier trained on real training images
(:func:`feature_classifier`, a ConvNet by default, cached as safetensors): ``phi(x)`` is the input of its last
linear layer. Two disjoint sets of real **test** images per class play "reference" ``R`` and "real candidate"
``R'``; the generated set ``X`` (same number per class) is compared with ``R`` exactly as ``R'`` is, so every
number has its ceiling next to it.

* **class fidelity**: fraction of generated images the classifier assigns to the class they were generated for
  (ceiling: the classifier's accuracy on ``R'``);
* **precision / recall / density / coverage** (Naeem et al., "Reliable Fidelity and Diversity Metrics for
  Generative Models", ICML 2020), per class then averaged over classes, with ``NND_k(x)`` the distance from
  ``x`` to its k-th nearest neighbour within its own set (:func:`prdc`);
* **Fréchet distance** between Gaussians fitted to ``phi(R)`` and ``phi(X)`` (all classes pooled; Heusel et al.
  2017 with this classifier in place of Inception, :func:`frechet_distance`);
* **GAN-train** (Shmelkov et al., "How good is my GAN?", ECCV 2018): a fresh network trained on ``N`` generated
  images per class, tested on the real test set, next to the same network and recipe trained on ``N`` random real
  training images per class (the project's evaluation protocol,
  :func:`fedlatent.distill.pixels.evaluate_synthetic`).

:func:`evaluate_generator` computes everything; :class:`QualityEvaluator` keeps the classifier, the real
features and the real GAN-train baseline so that periodic evaluation during training is cheap.
"""
from __future__ import annotations

import hashlib
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..utils import FedLatentError, atomic_write, torch_generator


# --- the metrics (one equation each) -------------------------------------------------------------------------
def _kth_nn_radius(x: torch.Tensor, k: int) -> torch.Tensor:
    """``NND_k(x_i)``: distance from each row of ``x`` to its k-th nearest other row."""
    if len(x) <= k:
        raise FedLatentError(f"k-NN radius needs more than k={k} samples, got {len(x)}")
    d = torch.cdist(x, x)
    return d.kthvalue(k + 1, dim=1).values  # the 1st smallest is the point itself (distance 0)


def prdc(real: torch.Tensor, fake: torch.Tensor, k: int = 5) -> dict[str, float]:
    """Precision, recall, density and coverage of ``fake`` w.r.t. ``real`` (Naeem et al. 2020, eqs. 1-4).

    With ``B(x, r)`` the open ball (strict ``<``, as in the authors' code) and ``NND_k`` the k-NN radius:

    * precision = (1/M) sum_j 1[exists i: Y_j in B(X_i, NND_k(X_i))]
    * recall    = (1/N) sum_i 1[exists j: X_i in B(Y_j, NND_k(Y_j))]
    * density   = (1/(kM)) sum_j sum_i 1[Y_j in B(X_i, NND_k(X_i))]
    * coverage  = (1/N) sum_i 1[exists j: Y_j in B(X_i, NND_k(X_i))]
    """
    real, fake = real.double(), fake.double()
    r_real, r_fake = _kth_nn_radius(real, k), _kth_nn_radius(fake, k)
    d = torch.cdist(real, fake)  # [N, M]
    in_real = d < r_real[:, None]  # Y_j inside the ball of X_i
    return {"precision": in_real.any(0).double().mean().item(),
            "recall": (d < r_fake[None, :]).any(1).double().mean().item(),
            "density": (in_real.double().sum(0) / k).mean().item(),
            "coverage": in_real.any(1).double().mean().item()}


def _sqrtm_psd(a: torch.Tensor) -> torch.Tensor:
    ev, vec = torch.linalg.eigh(a)
    return (vec * ev.clamp(min=0).sqrt()) @ vec.T


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """``||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^{1/2})`` of Gaussians fitted to the rows of ``a`` and ``b``.

    ``Tr (S_a S_b)^{1/2} = Tr (S_a^{1/2} S_b S_a^{1/2})^{1/2}``: the symmetric form, evaluated with eigh (exact
    for PSD matrices, no complex round-off).
    """
    a, b = a.double(), b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = torch.cov(a.T).reshape(a.shape[1], -1), torch.cov(b.T).reshape(b.shape[1], -1)
    ra = _sqrtm_psd(s_a)
    tr_sqrt = torch.linalg.eigvalsh(ra @ s_b @ ra).clamp(min=0).sqrt().sum()
    return float((mu_a - mu_b).square().sum() + s_a.trace() + s_b.trace() - 2 * tr_sqrt)


# --- the feature classifier ----------------------------------------------------------------------------------
@dataclass
class QualityConfig:
    """What :func:`evaluate_generator` measures, and how."""

    per_class: int = 100  # generated images per class (and real images in each of R, R') for fidelity/PRDC/FD
    nearest_k: int = 5
    classifier: str = "convnet:width=64"
    classifier_steps: int = 1500
    classifier_batch: int = 128
    gan_train: bool = True
    gan_train_per_class: int = 100
    gan_train_arch: str = "convnet"
    gan_train_epochs: int = 300
    gan_train_seeds: tuple = (0,)
    gan_train_max_test: int | None = None
    truncation_psi: float = 1.0
    seed: int = 0


def _cache_root() -> Path:
    base = os.environ.get("FEDLATENT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "fedlatent")
    return Path(base) / "quality"


def feature_classifier(data, arch: str = "convnet:width=64", steps: int = 1500, batch: int = 128, seed: int = 0,
                       cache: str | os.PathLike | None | bool = True, progress: bool = False):
    """A classifier trained on real training images (SGD momentum 0.9, lr 0.01, wd 5e-4, flip + crop for RGB),
    cached as safetensors under ``$FEDLATENT_CACHE/quality`` keyed by data, architecture, steps and seed."""
    from safetensors.torch import load_file, save_file
    from tqdm.auto import tqdm

    from ..models import get_model

    labels_sha = hashlib.sha256(data.y_train.cpu().numpy().tobytes()).hexdigest()[:12]
    tag = f"{data.name}-{data.channels}x{data.image_size}-{labels_sha}-{arch}-{steps}x{batch}-s{seed}"
    tag = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in tag)
    path = (_cache_root() if cache is True else Path(cache)) / f"{tag}.safetensors" if cache else None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = get_model(arch, data.channels, data.num_classes, data.image_size)
    if path is not None and path.is_file():
        model.load_state_dict(load_file(str(path)))
        return model.eval().requires_grad_(False)
    g = torch_generator(seed, "quality-classifier")
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    x, y = data.x_train, data.y_train
    model.train()
    for _ in tqdm(range(steps), desc="quality classifier", disable=not progress, leave=False):
        b = torch.randint(0, len(y), (batch,), generator=g)
        xb = x[b]
        if data.channels == 3:  # random flip and 4-px translation (standard CIFAR augmentation)
            flip = torch.rand(batch, generator=g) < 0.5
            xb = torch.where(flip[:, None, None, None], xb.flip(3), xb)
            s = data.image_size
            pad = F.pad(xb, (4, 4, 4, 4), mode="reflect")
            i, j = torch.randint(0, 9, (2,), generator=g).tolist()
            xb = pad[:, :, i:i + s, j:j + s]
        loss = F.cross_entropy(model(xb), y[b])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    model.eval().requires_grad_(False)
    if path is not None:
        sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        atomic_write(path, lambda p: save_file(sd, p))
    return model


def _last_linear(model: torch.nn.Module) -> torch.nn.Linear:
    lin = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    if not lin:
        raise FedLatentError("the quality classifier has no linear layer to take features from")
    return lin[-1]


@torch.no_grad()
def features_and_logits(model: torch.nn.Module, x: torch.Tensor, bs: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
    """``phi(x)`` (the input of the model's last linear layer) and the logits, in batches."""
    lin, store = _last_linear(model), []
    h = lin.register_forward_hook(lambda m, inp, out: store.append(inp[0].flatten(1)))
    try:
        logits = torch.cat([model(x[i:i + bs]) for i in range(0, len(x), bs)])
    finally:
        h.remove()
    return torch.cat(store), logits


# --- evaluation ----------------------------------------------------------------------------------------------
def _per_class_test_sets(data, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of two disjoint sets of ``n`` real test images per class (R, R')."""
    g = torch_generator(seed, "quality-real-sets")
    a, b = [], []
    for c in range(data.num_classes):
        idx = torch.nonzero(data.y_test == c).flatten()
        if len(idx) < 2 * n:
            raise FedLatentError(f"class {c} has {len(idx)} test images; per-class quality needs 2 x {n} "
                                 f"(lower --per-class)")
        idx = idx[torch.randperm(len(idx), generator=g)]
        a.append(idx[:n])
        b.append(idx[n:2 * n])
    return torch.cat(a), torch.cat(b)


def sample_images(G, labels: torch.Tensor, seed: int, psi: float = 1.0, bs: int = 250) -> torch.Tensor:
    """Generated images in [0, 1] for ``labels`` (seeded latents)."""
    g = torch_generator(seed, "quality-samples")
    with torch.no_grad():
        return torch.cat([G.to_unit(G.sample(labels[i:i + bs], generator=g, truncation_psi=psi)).clamp(0, 1)
                          for i in range(0, len(labels), bs)])


class QualityEvaluator:
    """Quality metrics of generators on one data set (classifier, real features and real baselines computed once).

    ``evaluator(G)`` returns a flat dict (generated values); :attr:`ceiling` holds the real-vs-real values under the
    same keys.
    """

    def __init__(self, data, cfg: QualityConfig | None = None, cache: str | os.PathLike | None | bool = True,
                 progress: bool = False):
        from ..data import normalize

        self.data, self.cfg, self.progress = data, cfg or QualityConfig(), progress
        cfg = self.cfg
        self._normalize = lambda x01: normalize(x01, data.mean, data.std)
        t0 = time.time()
        self.classifier = feature_classifier(data, cfg.classifier, cfg.classifier_steps, cfg.classifier_batch,
                                             cfg.seed, cache=cache, progress=progress)
        self.classifier_seconds = time.time() - t0
        ia, ib = _per_class_test_sets(data, cfg.per_class, cfg.seed)
        self.labels = data.y_test[ia]
        self.real_feats, _ = features_and_logits(self.classifier, data.x_test[ia])
        feats_b, logits_b = features_and_logits(self.classifier, data.x_test[ib])
        self.classifier_test_acc = float((features_and_logits(self.classifier, data.x_test)[1].argmax(1)
                                          == data.y_test).double().mean())
        self.ceiling = self._feature_metrics(feats_b, logits_b, data.y_test[ib])
        self.ceiling["classifier_test_acc"] = self.classifier_test_acc
        if cfg.gan_train:
            from ..evaluate import real_subset

            xr, yr = real_subset(data, cfg.gan_train_per_class, cfg.seed)
            self.ceiling.update(self._gan_train(xr, yr))

    def _feature_metrics(self, feats: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> dict:
        k = self.cfg.nearest_k
        per = [prdc(self.real_feats[self.labels == c], feats[labels == c], k) for c in range(self.data.num_classes)]
        out = {"fidelity": float((logits.argmax(1) == labels).double().mean())}
        for key in ("precision", "recall", "density", "coverage"):
            out[key] = float(np.mean([p[key] for p in per]))
        out["fd"] = frechet_distance(self.real_feats, feats)
        out["per_class_fidelity"] = [round(float((logits.argmax(1)[labels == c] == c).double().mean()), 3)
                                     for c in range(self.data.num_classes)]
        out["per_class_coverage"] = [round(p["coverage"], 3) for p in per]
        return out

    def _gan_train(self, x_norm: torch.Tensor, y: torch.Tensor) -> dict:
        from ..distill.pixels import evaluate_synthetic

        cfg = self.cfg
        with torch.random.fork_rng(devices=[]):
            r = evaluate_synthetic(x_norm, y, cfg.gan_train_arch, self.data, epochs=cfg.gan_train_epochs,
                                   seeds=tuple(cfg.gan_train_seeds), progress=self.progress,
                                   max_test=cfg.gan_train_max_test)
        return {"gan_train": r["mean"], "gan_train_std": r["std"]}

    def images(self, G) -> tuple[torch.Tensor, torch.Tensor]:
        """``per_class`` generated images per class (in [0, 1]) and their labels."""
        if G.c_dim and G.c_dim < self.data.num_classes:
            raise FedLatentError(f"generator knows {G.c_dim} classes, the data set has {self.data.num_classes}")
        if G.img_channels != self.data.channels or G.img_resolution != self.data.image_size:
            raise FedLatentError(f"generator makes {G.img_channels}x{G.img_resolution}px images, the data set has "
                                 f"{self.data.channels}x{self.data.image_size}px")
        labels = torch.arange(self.data.num_classes).repeat_interleave(self.cfg.per_class)
        return sample_images(G, labels, self.cfg.seed, self.cfg.truncation_psi), labels

    def __call__(self, G, gan_train: bool | None = None) -> dict:
        x01, labels = self.images(G)
        xn = self._normalize(x01)
        feats, logits = features_and_logits(self.classifier, xn)
        out = self._feature_metrics(feats, logits, labels)
        if self.cfg.gan_train if gan_train is None else gan_train:
            n = self.cfg.gan_train_per_class
            if n != self.cfg.per_class:
                lab = torch.arange(self.data.num_classes).repeat_interleave(n)
                xn, labels = self._normalize(sample_images(G, lab, self.cfg.seed + 1, self.cfg.truncation_psi)), lab
            out.update(self._gan_train(xn, labels))
        return out


METRICS = ("fidelity", "precision", "recall", "density", "coverage", "fd", "gan_train")


def evaluate_generator(G, data, cfg: QualityConfig | None = None, cache=True, progress: bool = False) -> dict:
    """``{"generated": {...}, "real": {...}, "config": {...}}`` for generator ``G`` on ``data``."""
    ev = QualityEvaluator(data, cfg, cache=cache, progress=progress)
    return {"generated": ev(G), "real": ev.ceiling, "config": asdict(ev.cfg)}


def save_grid(G, path: str | os.PathLike, num_classes: int, per_row: int = 10, seed: int = 0, psi: float = 1.0,
              scale: int = 2) -> Path:
    """A PNG of ``per_row`` samples of every class (one row per class)."""
    from torchvision.utils import save_image

    labels = torch.arange(num_classes).repeat_interleave(per_row)
    x = sample_images(G, labels, seed, psi)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(F.interpolate(x, scale_factor=scale, mode="nearest"), str(path), nrow=per_row, padding=1)
    return path


def format_quality(rows: list[tuple[str, dict]], ceiling: dict) -> str:
    """A text table: one row per generator and a last row with the real-vs-real ceiling."""
    head = f"{'generator':28s} " + " ".join(f"{m:>9s}" for m in METRICS)
    lines = [head]

    def fmt(d):
        return " ".join(f"{d[m]:9.3f}" if m in d and d[m] is not None else f"{'-':>9s}" for m in METRICS)

    for name, d in rows:
        lines.append(f"{name[:28]:28s} {fmt(d)}")
    lines.append(f"{'real (ceiling)':28s} {fmt(ceiling)}")
    return "\n".join(lines)


__all__ = ["prdc", "frechet_distance", "QualityConfig", "QualityEvaluator", "evaluate_generator", "feature_classifier",
           "features_and_logits", "sample_images", "save_grid", "format_quality", "METRICS"]
