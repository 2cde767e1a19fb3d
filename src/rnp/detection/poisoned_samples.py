"""Scores for every sample of a (possibly poisoned) training set: higher = more likely poisoned.

Each detector is a small class built from a dataclass config with one method,
``score(model, data, clean, *, device="cpu") -> torch.Tensor``: one float per sample of
``data``, in order. ``clean`` is the defender's small clean :class:`ImageSet`: STRIP blends it
in, Activation Clustering uses it by default to tell its two clusters apart, the others
ignore it. The model is run in eval mode under ``torch.inference_mode`` and its train/eval
mode is restored; its weights are never touched. Scores feed :mod:`rnp.metrics.detection`.

- ``unlearned`` (:class:`UnlearnedMargin`): the margin of the given label under RNP's
  unlearned model, whose clean accuracy has collapsed while the backdoor still fits its
  poisoned samples.
- ``loss`` (:class:`LossScore`): minus the cross-entropy of the model's prediction against the
  sample's given label. Poisoned samples are learned early and fit well (low loss), which is
  the observation behind Anti-Backdoor Learning (Li, Lyu, Koren, Lyu, Li and Ma, NeurIPS 2021,
  arXiv 2110.11571). Model-agnostic, so it also scores an unlearned model.
- ``ss`` (:class:`SpectralSignatures`): Tran, Li and Madry, "Spectral Signatures in Backdoor
  Attacks", NeurIPS 2018 (arXiv 1811.00636). Per given label, the representations are centred
  and each sample scores its squared projection on the top right singular vector. Classes with
  fewer than 2 samples score 0. The paper then removes the ``1.5 * epsilon`` highest scores per
  label; ranking by the score is what it leaves here.
- ``ac`` (:class:`ActivationClustering`): Chen, Carvalho, Baracaldo, Ludwig, Edwards, Lee,
  Molloy and Srivastava, "Detecting Backdoor Attacks on Deep Neural Networks by Activation
  Clustering", AAAI SafeAI workshop 2019 (arXiv 1811.03728). Per given label, the
  representations are reduced to 10 dimensions and split by k-means with k = 2. Deviations:
  (1) the paper reduces with ICA; here the top 10 principal components are whitened (scaled
  to unit variance) with ``torch.linalg.svd``, since scipy/sklearn are not dependencies. ICA
  of the same 10 dimensions is this whitened projection times an orthogonal matrix, and
  k-means distances do not change under rotation, so the clustering is the paper's up to the
  ICA solver's convergence (``whiten=False`` clusters plain PCA coordinates instead). (2)
  k-means is our own (k-means++ seeding, Lloyd iterations, ``restarts`` seeded restarts
  keeping the lowest inertia). (3) The paper's output is binary (a cluster is poison or
  not); AUROC needs a ranking, and the default decides which cluster is poison with the
  defender's clean images rather than by size; see :class:`ActivationClustering` for both.
- ``strip`` (:class:`Strip`): Gao, Xu, Wang, Chen, Ranasinghe and Nepal, "STRIP: A Defence
  Against Trojan Attacks on Deep Neural Networks", ACSAC 2019 (arXiv 1902.06531). Each sample
  is superimposed with N clean images drawn at random (seeded) and scores minus the mean
  Shannon entropy (bits) of the softmax over the N: a trigger keeps the prediction on its
  target whatever is blended in, so triggered inputs stay confident (low entropy). Defaults
  from the authors' CIFAR-10 release (github.com/garrisongys/STRIP,
  ``STRIP_CIFAR10DeepArchit_Tb.ipynb``): N = 100 (``n_sample``), the superimposition is
  ``cv2.addWeighted(background, 1, overlay, 1, 0)`` on [0, 1] images, i.e. the plain sum fed
  unclipped, and the entropy is ``-sum p log2 p`` summed over the N and divided by N.
  Deviation: overlays come from the defender's clean set rather than held-out training images.

SS and AC read the same representation: the input of the model's last ``nn.Linear`` (the last
one ``named_modules`` lists), captured by a forward hook (:func:`last_linear_features`), which
is the penultimate layer for every classifier that ends in a linear head.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from rnp.data.images import ImageSet
from rnp.data.loader import iterate_batches
from rnp.detection.exposure import Exposure, expose
from rnp.errors import RnpError
from rnp.models.probes import capture_activations, eval_mode
from rnp.training.evaluate import predict
from rnp.utils import generator_for, progress_bar


def _check_batch_size(batch_size) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise RnpError(f"batch_size must be a positive integer, got {batch_size!r}")


def _check_data(data: ImageSet) -> None:
    if not isinstance(data, ImageSet):
        raise RnpError(f"data must be an ImageSet, got {type(data).__name__}")


def last_linear(model: nn.Module) -> nn.Linear:
    """The last ``nn.Linear`` in ``model.named_modules()`` order."""
    found = [m for _, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not found:
        raise RnpError(f"{type(model).__name__} has no nn.Linear layer whose input could serve as "
                       "the sample representation")
    return found[-1]


def last_linear_features(model: nn.Module, data: ImageSet, *, batch_size: int = 512,
                         device="cpu") -> torch.Tensor:
    """The input of the model's last ``nn.Linear`` for every sample, ``(N, D)`` float32 on CPU.

    Shared by Spectral Signatures and Activation Clustering. The model runs in eval mode
    under ``torch.inference_mode`` with channels-last input; its mode is restored and the hook
    removed afterwards.
    """
    _check_data(data)
    layer = last_linear(model)
    captured: list[torch.Tensor] = []

    def record(name: str, features: torch.Tensor) -> None:
        captured.append(features.reshape(features.shape[0], -1).float().cpu())

    with eval_mode(model), capture_activations({"last_linear": layer}, record, inputs=True), torch.inference_mode():
        for images, _ in iterate_batches(data, batch_size, device=device):
            model(images.contiguous(memory_format=torch.channels_last))
    if len(captured) != math.ceil(len(data) / batch_size):
        raise RnpError(f"the last nn.Linear of {type(model).__name__} ran {len(captured)} times for "
                       f"{math.ceil(len(data) / batch_size)} batches; its input is no per-sample "
                       "representation")
    return torch.cat(captured) if captured else torch.empty(0, layer.in_features)


# ----------------------------------------------------------------------------------- loss


@dataclass
class LossScoreConfig:
    """Loss-based score; its only setting is the evaluation batch size."""

    batch_size: int = 512  # evaluation batch (no effect on the scores)

    def __post_init__(self):
        _check_batch_size(self.batch_size)


class LossScore:
    """Score = minus the per-sample cross-entropy against the given label (low loss = suspicious)."""

    name = "loss"

    def __init__(self, config: LossScoreConfig | None = None):
        self.config = config or LossScoreConfig()

    def score(self, model: nn.Module, data: ImageSet, clean: ImageSet | None = None, *,
              device="cpu") -> torch.Tensor:
        _check_data(data)
        logits = predict(model, data, batch_size=self.config.batch_size, device=device,
                         return_logits=True)
        if len(data) == 0:
            return torch.empty(0)
        return -F.cross_entropy(logits, data.labels, reduction="none")


# ------------------------------------------------------------------------- spectral signatures


@dataclass
class SpectralSignaturesConfig:
    """Spectral Signatures has no hyperparameter that changes the scores (the paper's removal
    of 1.5 epsilon per label acts on them afterwards); only the evaluation batch size."""

    batch_size: int = 512  # evaluation batch (no effect on the scores)

    def __post_init__(self):
        _check_batch_size(self.batch_size)


class SpectralSignatures:
    """Score = squared projection of the centred representation on its label's top singular
    vector (Tran et al. 2018, Algorithm 1)."""

    name = "ss"

    def __init__(self, config: SpectralSignaturesConfig | None = None):
        self.config = config or SpectralSignaturesConfig()

    def score(self, model: nn.Module, data: ImageSet, clean: ImageSet | None = None, *,
              device="cpu") -> torch.Tensor:
        features = last_linear_features(model, data, batch_size=self.config.batch_size,
                                        device=device)
        scores = torch.zeros(len(data), dtype=torch.float64)
        for label in data.labels.unique():
            members = (data.labels == label).nonzero().squeeze(1)
            if len(members) >= 2:
                scores[members] = spectral_scores(features[members])
        return scores.float()

    def score_with_reference(self, model: nn.Module, data: ImageSet, clean: ImageSet | None,
                             reference: ImageSet, *, device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """The scores of ``data``, and those of the ``reference`` images measured against the
        statistics of ``data`` (each label's mean and top singular vector), as one more sample
        of that label would score. References of a label with fewer than 2 samples score 0."""
        features = last_linear_features(model, data, batch_size=self.config.batch_size, device=device)
        reference_features = last_linear_features(model, reference, batch_size=self.config.batch_size,
                                                  device=device)
        scores = torch.zeros(len(data), dtype=torch.float64)
        reference_scores = torch.zeros(len(reference), dtype=torch.float64)
        for label in data.labels.unique():
            members = data.labels == label
            if int(members.sum()) >= 2:
                project = spectral_projection(features[members])
                scores[members] = project(features[members])
                others = reference.labels == label
                reference_scores[others] = project(reference_features[others])
        return scores.float(), reference_scores.float()


def spectral_scores(representations: torch.Tensor) -> torch.Tensor:
    """Squared projections of the centred rows on their top right singular vector."""
    return spectral_projection(representations)(representations)


def spectral_projection(representations: torch.Tensor):
    """A function giving rows' squared projections on the top right singular vector of
    ``representations`` once centred (with their mean)."""
    mean = representations.double().mean(0)
    _, _, vh = torch.linalg.svd(representations.double() - mean, full_matrices=False)
    return lambda rows: ((rows.double() - mean) @ vh[0]) ** 2


# ------------------------------------------------------------------------ activation clustering

ORIENTATIONS = ("clean", "size")


@dataclass
class ActivationClusteringConfig:
    """Hyperparameters of Activation Clustering (defaults: the paper and IBM's ART release,
    except ``orientation``, see :class:`ActivationClustering`)."""

    components: int = 10  # (paper) ICA to 10 dimensions; here PCA, see module docstring
    whiten: bool = True  # (paper: ICA sources have unit variance) False: plain PCA coordinates
    clusters: int = 2  # (paper) k-means with k = 2 per label
    restarts: int = 10  # (ART's sklearn KMeans default n_init) seeded k-means restarts
    max_iter: int = 300  # (sklearn KMeans default) Lloyd iterations per restart at most
    size_threshold: float = 0.35  # (ART ActivationDefence) relative size: smaller cluster < this
    orientation: str = "clean"  # which cluster the score calls poison: "clean" or "size" (paper)
    seed: int = 0  # k-means seeding; each label draws from its own stream
    batch_size: int = 512  # evaluation batch (no effect on the scores)

    def __post_init__(self):
        _check_batch_size(self.batch_size)
        for name in ("components", "restarts", "max_iter"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise RnpError(f"{name} must be a positive integer, got {value!r}")
        if self.clusters != 2:
            raise RnpError(f"Activation Clustering splits each label in 2 clusters, got {self.clusters}")
        if not 0 < self.size_threshold < 1:
            raise RnpError(f"size_threshold must lie in (0, 1), got {self.size_threshold}")
        if self.orientation not in ORIENTATIONS:
            raise RnpError(f"orientation must be one of {', '.join(ORIENTATIONS)}, "
                           f"got {self.orientation!r}")


@dataclass(frozen=True, eq=False)
class ClusteringResult:
    """What Activation Clustering found: per-sample ``scores``, and per label (indexed by label)
    the fraction of its samples in the smaller cluster and whether the paper's relative-size
    criterion flags it (smaller cluster below ``size_threshold``). Labels that were not
    clustered (fewer than 3 samples, or no spread) have fraction 0 and are not flagged.
    ``reference_scores``: those of the reference images asked for (empty when none were)."""

    scores: torch.Tensor
    smaller_fraction: torch.Tensor
    flagged: torch.Tensor
    reference_scores: torch.Tensor


class ActivationClustering:
    """Activation Clustering with a continuous score.

    Score of a sample = ``d_other - d_poison``: its distance to the centroid of the cluster
    judged clean minus its distance to the centroid of the cluster judged poison, in the
    reduced space of its label. Positive means "on the poison side", and the magnitude grows
    with how far apart the two clusters lie, so a label that splits cleanly in two (the
    paper's signature of poison) ranks above a label whose split is arbitrary. With
    ``whiten`` every label is on the same unit-variance scale. Labels with fewer than 3
    samples, or no spread, score 0.

    Which cluster is "poison" (``orientation``):

    - ``"size"``: the smaller one, as in the paper's relative-size analysis. It assumes the
      poison is a minority of its label, which all-to-one poisoning breaks: at poison rate
      ``r`` over ``K`` balanced classes the target label holds ``r K / (1 + r (K - 1))`` poison,
      53% for 10% on CIFAR-10, and the ranking inverts (CIFAR-10 BadNets AUROC 0.20,
      against 0.86 with ``"clean"``).
    - ``"clean"`` (default, a deviation): the one whose centroid lies farther from the mean of
      the defender's clean images of that label, projected the same way. It stands in for
      the paper's exclusionary reclassification (which retrains without a cluster to see
      whether the cluster then reads as its label) at no training cost. Labels without clean
      images fall back to ``"size"``.

    :meth:`analyze` also reports the paper's binary relative-size flag per label.
    """

    name = "ac"

    def __init__(self, config: ActivationClusteringConfig | None = None):
        self.config = config or ActivationClusteringConfig()

    def score(self, model: nn.Module, data: ImageSet, clean: ImageSet | None = None, *,
              device="cpu") -> torch.Tensor:
        return self.analyze(model, data, clean, device=device).scores

    def score_with_reference(self, model: nn.Module, data: ImageSet, clean: ImageSet | None,
                             reference: ImageSet, *, device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """The scores of ``data``, and those of the ``reference`` images placed in the clusters
        found in ``data`` (each label's projection, centroids and poison side), as one more
        sample of that label would score. References of a label not clustered score 0."""
        result = self.analyze(model, data, clean, device=device, reference=reference)
        return result.scores, result.reference_scores

    def analyze(self, model: nn.Module, data: ImageSet, clean: ImageSet | None = None, *,
                device="cpu", reference: ImageSet | None = None) -> ClusteringResult:
        """Scores plus the paper's per-label relative-size flag (and the ``reference`` images'
        scores, see :meth:`score_with_reference`)."""
        if self.config.orientation == "clean" and not isinstance(clean, ImageSet):
            raise RnpError("Activation Clustering with orientation 'clean' needs the defender's "
                           "clean images (or use orientation 'size')")
        features = last_linear_features(model, data, batch_size=self.config.batch_size,
                                        device=device)
        clean_features = clean_labels = None
        if self.config.orientation == "clean":
            clean_features = last_linear_features(model, clean, batch_size=self.config.batch_size,
                                                  device=device)
            clean_labels = clean.labels
        extra = None
        if reference is not None:
            extra = last_linear_features(model, reference, batch_size=self.config.batch_size, device=device)
        scores = torch.zeros(len(data), dtype=torch.float64)
        reference_scores = torch.zeros(0 if reference is None else len(reference), dtype=torch.float64)
        fraction = torch.zeros(data.num_classes, dtype=torch.float64)
        for label in data.labels.unique().tolist():
            members = (data.labels == label).nonzero().squeeze(1)
            clean_rows = None if clean_features is None else clean_features[clean_labels == label]
            outcome = self._cluster_label(features[members], clean_rows, label)
            if outcome is not None:
                score_rows, fraction[label] = outcome
                scores[members] = score_rows(features[members])
                if extra is not None:
                    others = reference.labels == label
                    reference_scores[others] = score_rows(extra[others])
        flagged = (fraction > 0) & (fraction < self.config.size_threshold)
        return ClusteringResult(scores.float(), fraction.float(), flagged, reference_scores.float())

    def _cluster_label(self, representations: torch.Tensor, clean_rows: torch.Tensor | None,
                       label: int):
        """A function scoring rows against one label's two clusters, and the fraction of the
        label's samples in its smaller cluster."""
        projection = principal_projection(representations, self.config.components,
                                          self.config.whiten)
        if projection is None:
            return None
        reduced = projection(representations)
        generator = generator_for(self.config.seed, f"activation-clustering:{label}")
        assignment, centroids = kmeans(reduced, self.config.clusters, self.config.restarts,
                                       self.config.max_iter, generator)
        sizes = torch.bincount(assignment, minlength=2)
        poison = int(sizes.argmin())
        if clean_rows is not None and len(clean_rows):
            clean_centre = projection(clean_rows).mean(0)
            poison = int((centroids - clean_centre).norm(dim=1).argmax())

        def score_rows(rows: torch.Tensor) -> torch.Tensor:
            distances = torch.cdist(projection(rows), centroids)
            return distances[:, 1 - poison] - distances[:, poison]

        return score_rows, float(sizes.min()) / len(reduced)


def principal_projection(representations: torch.Tensor, components: int, whiten: bool):
    """A function mapping rows to their coordinates on the top ``components`` principal axes
    of ``representations`` (each scaled to unit variance with ``whiten``); axes without
    variance are dropped. None when fewer than 3 rows or no spread."""
    if len(representations) < 3:
        return None
    mean = representations.double().mean(0)
    _, s, vh = torch.linalg.svd(representations.double() - mean, full_matrices=False)
    keep = (s > s[0] * 1e-6) if float(s[0]) > 0 else torch.zeros_like(s, dtype=torch.bool)
    keep[components:] = False
    if not bool(keep.any()):
        return None
    axes = vh[keep].T
    scale = s[keep] / math.sqrt(len(representations) - 1) if whiten else torch.ones(int(keep.sum()))

    def project(rows: torch.Tensor) -> torch.Tensor:
        return ((rows.double() - mean) @ axes) / scale.double()

    return project


def kmeans(points: torch.Tensor, k: int, restarts: int, max_iter: int,
           generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means from k-means++ seeds, best of ``restarts`` by inertia.

    Returns the cluster of every point and the ``(k, D)`` centroids. A cluster that empties
    keeps its previous centroid. Deterministic for a given generator state.
    """
    best: tuple[float, torch.Tensor, torch.Tensor] | None = None
    for _ in range(restarts):
        centroids = _kmeans_plus_plus(points, k, generator)
        assignment = torch.cdist(points, centroids).argmin(1)
        for _ in range(max_iter):
            centroids = torch.stack([points[assignment == j].mean(0) if bool((assignment == j).any())
                                     else centroids[j] for j in range(k)])
            updated = torch.cdist(points, centroids).argmin(1)
            if torch.equal(updated, assignment):
                break
            assignment = updated
        inertia = float(torch.cdist(points, centroids).min(1).values.pow(2).sum())
        if best is None or inertia < best[0]:
            best = (inertia, assignment, centroids)
    return best[1], best[2]


def _kmeans_plus_plus(points: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """k-means++ seeding: each new centre drawn with probability proportional to the squared
    distance to the nearest centre already chosen."""
    chosen = [int(torch.randint(len(points), (1,), generator=generator))]
    for _ in range(1, k):
        nearest = torch.cdist(points, points[chosen]).min(1).values.pow(2)
        if float(nearest.sum()) == 0:
            chosen.append(chosen[0])
            continue
        chosen.append(int(torch.multinomial(nearest, 1, generator=generator)))
    return points[chosen].clone()


# ---------------------------------------------------------------------------------- STRIP


@dataclass
class StripConfig:
    """Hyperparameters of STRIP (defaults: the authors' CIFAR-10 release, STRIP_CIFAR10DeepArchit_Tb)."""

    overlays: int = 100  # (release n_sample = 100) clean images superimposed on each sample
    image_weight: float = 1.0  # (release) cv2.addWeighted(background, 1, overlay, 1, 0)
    overlay_weight: float = 1.0  # (release) the sum is fed unclipped, as the release does
    seed: int = 0  # overlay draws
    batch_size: int = 1024  # images per forward pass (samples x overlays; no effect on scores)

    def __post_init__(self):
        _check_batch_size(self.batch_size)
        if isinstance(self.overlays, bool) or not isinstance(self.overlays, int) or self.overlays < 1:
            raise RnpError(f"overlays must be a positive integer, got {self.overlays!r}")
        if self.image_weight <= 0 or self.overlay_weight <= 0:
            raise RnpError("image_weight and overlay_weight must be positive")


class Strip:
    """Score = minus the mean entropy (bits) of the softmax over the superimposed copies."""

    name = "strip"

    def __init__(self, config: StripConfig | None = None):
        self.config = config or StripConfig()

    def score(self, model: nn.Module, data: ImageSet, clean: ImageSet | None = None, *,
              device="cpu", progress: bool = False) -> torch.Tensor:
        _check_data(data)
        if not isinstance(clean, ImageSet) or len(clean) == 0:
            raise RnpError("STRIP needs the defender's clean images to superimpose")
        if clean.image_shape != data.image_shape:
            raise RnpError(f"clean images are {clean.image_shape}, the data {data.image_shape}")
        generator = generator_for(self.config.seed, "strip-overlays")
        draws = torch.randint(len(clean), (len(data), self.config.overlays), generator=generator)
        overlays = clean.images.to(device).float().div_(255)
        chunk = max(1, self.config.batch_size // self.config.overlays)
        entropies = []
        with eval_mode(model), torch.inference_mode(), \
                progress_bar(len(data), "STRIP", progress, unit="image") as bar:
            for start in range(0, len(data), chunk):
                stop = min(start + chunk, len(data))
                entropies.append(self._mean_entropy(model, data.images[start:stop].to(device),
                                                    overlays[draws[start:stop].to(device)]))
                if bar is not None:
                    bar.update(stop - start)
        return -torch.cat(entropies) if entropies else torch.empty(0)

    def _mean_entropy(self, model: nn.Module, images: torch.Tensor,
                      overlays: torch.Tensor) -> torch.Tensor:
        """Mean entropy over the overlays of ``images`` (S, C, H, W) uint8, ``overlays``
        (S, N, C, H, W) float: one value per image, on the CPU."""
        blended = (self.config.image_weight * images.float().div(255)[:, None]
                   + self.config.overlay_weight * overlays)
        logits = model(blended.flatten(0, 1).contiguous(memory_format=torch.channels_last)).float()
        log_p = F.log_softmax(logits, dim=1)
        entropy = -(log_p.exp() * log_p).sum(1) / math.log(2)
        return entropy.view(len(images), -1).mean(1).cpu()


class UnlearnedMargin(LossScore):
    """Score = the logit margin of the given label under RNP's *unlearned* model
    (:mod:`rnp.detection.exposure`): its logit minus the largest other logit.

    Unlearning breaks the clean function but not the backdoor, so the unlearned model still
    fits a poisoned sample's (target) label while clean samples lose theirs. The margin, not
    the cross-entropy, because the unlearned model is so sure of the target that the
    cross-entropy of many samples rounds to exactly 0 and ties (measured on CIFAR-10 BadNets:
    AUROC 0.95 and no detection at 5% FPR with the loss, 0.999 with the margin). The exposure
    is made from ``clean`` in float32 unless one is given (e.g. from an RNP run).
    """

    name = "unlearned"

    def score(self, model: nn.Module, data: ImageSet, clean: ImageSet | None = None, *,
              device="cpu", exposure: Exposure | None = None) -> torch.Tensor:
        _check_data(data)
        if exposure is None:
            if not isinstance(clean, ImageSet):
                raise RnpError("the unlearned-model score needs the defender's clean images")
            exposure = expose(model, clean, amp="off")
        logits = predict(exposure.unlearned, data, batch_size=self.config.batch_size, device=device,
                         return_logits=True).double()
        if len(data) == 0:
            return torch.empty(0)
        rows = torch.arange(len(data))
        given = logits[rows, data.labels]
        logits[rows, data.labels] = -math.inf
        return (given - logits.max(1).values).float()


SAMPLE_DETECTORS = {"unlearned": UnlearnedMargin, "loss": LossScore, "ac": ActivationClustering,
                    "ss": SpectralSignatures, "strip": Strip}
