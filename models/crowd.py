"""Labels from several annotators: majority vote, and the EM of AggNet in log space.

Pathology labels come from annotators of mixed quality; some are spammers (they answer at
random, or "yes" to everything). A majority vote counts every annotator alike, so a
crowd with enough spammers outvotes the good annotators. AggNet (Albarqouni et al.,
2016, after Raykar et al., 2010) learns each annotator's reliability during training:
annotator ``j`` has a sensitivity ``alpha_j`` and a specificity ``beta_j`` for a class
(one-vs-all), and for an item ``i`` (a pixel, or a tile) with labels ``y_ij`` and the
network's probability ``p_i``::

    a_i = prod_j alpha_j^y_ij (1 - alpha_j)^(1 - y_ij)
    b_i = prod_j beta_j^(1 - y_ij) (1 - beta_j)^y_ij      (over the annotators of item i)
    E-step: mu_i = a_i p_i / (a_i p_i + b_i (1 - p_i))
    M-step: alpha_j = sum_i mu_i y_ij / sum_i mu_i
            beta_j = sum_i (1 - mu_i)(1 - y_ij) / sum_i (1 - mu_i)   (items j labelled)

and the spammer score ``S_j = (alpha_j + beta_j - 1)^2`` is 0 for an annotator whose
answer does not depend on the truth. Everything here is computed in log space (``a_i``
is a product over annotators) with ``alpha`` and ``beta`` clipped into ``[eps, 1 - eps]``,
vectorised over the items in torch, for every class at once.

The training side is ``models.aggnet``: the same EM inside
``models.seg_training.fit``, with the network's probabilities in place of a class prior.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from models.metrics import IGNORE
from models.patches import TrainingDataInvalid

log = logging.getLogger(__name__)

#: ``(N, H, W, J)`` uint8: annotator ``j``'s class of each pixel, ``IGNORE`` where j did
#: not label it (channels last, so the stack goes through ``models.patches.augment``).
CrowdMasks = npt.NDArray[np.uint8]
#: ``(N, J)`` int64: annotator ``j``'s class of each patch, -1 where j did not label it.
CrowdTileLabels = npt.NDArray[np.int64]
Floats = npt.NDArray[np.float64]

DEFAULT_EPS = 1e-3


# -- the labels --------------------------------------------------------------------------
@dataclass
class CrowdLabels:
    """Every annotator's labels of a :class:`models.patches.PatchDataset`'s patches,
    aligned with its first axis (see :data:`CrowdMasks`, :data:`CrowdTileLabels`)."""

    annotators: tuple[str, ...]
    masks: CrowdMasks
    labels: CrowdTileLabels

    def __post_init__(self) -> None:
        j = len(self.annotators)
        if len(set(self.annotators)) != j:
            raise TrainingDataInvalid(f"annotator names must be unique: {self.annotators}")
        if self.masks.ndim != 4 or self.masks.shape[-1] != j or self.labels.shape != (
                len(self.masks), j):
            raise TrainingDataInvalid(f"crowd masks {self.masks.shape} and labels "
                                      f"{self.labels.shape} do not fit {j} annotators")

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: npt.ArrayLike) -> CrowdLabels:
        i = np.asarray(index, dtype=np.int64)
        return CrowdLabels(self.annotators, self.masks[i], self.labels[i])

    def aligned(self, annotators: Sequence[str]) -> CrowdLabels:
        """The same labels over ``annotators`` (a superset), missing for the new ones."""
        where = [self.annotators.index(a) if a in self.annotators else -1 for a in annotators]
        masks = np.full((*self.masks.shape[:3], len(annotators)), IGNORE, np.uint8)
        labels = np.full((len(self), len(annotators)), -1, np.int64)
        for new, old in enumerate(where):
            if old >= 0:
                masks[..., new] = self.masks[..., old]
                labels[:, new] = self.labels[:, old]
        return CrowdLabels(tuple(annotators), masks, labels)

    @staticmethod
    def concat(parts: Sequence[CrowdLabels]) -> CrowdLabels:
        """Parts with different annotators are joined over all of them (sorted)."""
        if not parts:
            raise TrainingDataInvalid("no crowd labels")
        names = tuple(sorted({a for p in parts for a in p.annotators}))
        aligned = [p.aligned(names) for p in parts]
        return CrowdLabels(names, np.concatenate([p.masks for p in aligned]),
                           np.concatenate([p.labels for p in aligned]))

    def summary(self) -> dict[str, dict[str, int]]:
        """Per annotator: how many patches it labelled (mask or label) and pixels."""
        pixels = (self.masks != IGNORE).sum(axis=(0, 1, 2))
        tiles = ((self.masks != IGNORE).any(axis=(1, 2)) | (self.labels >= 0)).sum(axis=0)
        return {a: {"patches": int(t), "pixels": int(p)}
                for a, t, p in zip(self.annotators, tiles, pixels)}


def majority_vote(votes: npt.NDArray[np.integer[Any]], n_classes: int,
                  missing: int) -> npt.NDArray[np.int64]:
    """The class most annotators gave each item (``votes``: (..., J), a class index or
    anything outside ``[0, n_classes)`` where unlabelled); ``missing`` where nobody
    labelled the item or the most-voted classes tie (no majority)."""
    counts = np.stack([(votes == c).sum(axis=-1) for c in range(n_classes)], axis=-1)
    best = counts.argmax(axis=-1)
    top = counts.max(axis=-1)
    tie = (counts == top[..., None]).sum(axis=-1) > 1
    out: npt.NDArray[np.int64] = np.where((top == 0) | tie, missing, best).astype(np.int64)
    return out


def labelled_patches(labels: npt.NDArray[np.int64], crowd: CrowdLabels,
                     n_classes: int) -> npt.NDArray[np.int64]:
    """Majority-vote patch labels with the ties (-1) of patches that annotators did
    label set to a class of the tie: for :class:`AggNet`, which reads the votes, a label
    only marks a patch as labelled, and a tie is as informative as any."""
    voted = (crowd.labels >= 0) & (crowd.labels < n_classes)
    counts = np.stack([(crowd.labels == c).sum(1) for c in range(n_classes)], 1)
    out: npt.NDArray[np.int64] = np.where((labels < 0) & voted.any(1), counts.argmax(1),
                                          labels).astype(np.int64)
    return out


# -- EM in log space ---------------------------------------------------------------------
def one_hot_votes(votes: torch.Tensor, n_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``votes`` (M, J) integer -> (``y`` (M, J, K) float one-vs-all labels, ``labelled``
    (M, J) float); a vote outside ``[0, n_classes)`` means "not labelled"."""
    votes = votes.long()
    labelled = (votes >= 0) & (votes < n_classes)
    y = torch.nn.functional.one_hot(torch.where(labelled, votes, 0), n_classes)
    return (y * labelled[..., None]).float(), labelled.float()


def log_likelihoods(y: torch.Tensor, labelled: torch.Tensor, alpha: torch.Tensor,
                    beta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(ln a, ln b), each (M, K): the annotators' labels' log-likelihood if the item is of
    the class (``a``) and if it is not (``b``); ``alpha``, ``beta`` (J, K). An item nobody
    labelled gets 0 for both (no evidence)."""
    la, l1a = torch.log(alpha), torch.log1p(-alpha)
    lb, l1b = torch.log(beta), torch.log1p(-beta)
    log_a = torch.einsum("mjk,jk->mk", y, la - l1a) + labelled @ l1a
    log_b = labelled @ lb + torch.einsum("mjk,jk->mk", y, l1b - lb)
    return log_a, log_b


def posterior(log_a: torch.Tensor, log_b: torch.Tensor, log_p: torch.Tensor,
              log_1mp: torch.Tensor) -> torch.Tensor:
    """The E-step, ``mu = a p / (a p + b (1 - p))``, as a logistic of log-odds."""
    return torch.sigmoid(log_a + log_p - log_b - log_1mp)


def log_one_minus_softmax(logits: torch.Tensor) -> torch.Tensor:
    """``ln(1 - softmax(logits))`` over the last axis without cancellation: the
    log-sum-exp of the other classes' logits minus that of all."""
    k = logits.shape[-1]
    others = logits[..., None, :].expand(*logits.shape, k).clone()
    eye = torch.eye(k, dtype=torch.bool, device=logits.device)
    others = others.masked_fill(eye, float("-inf"))
    return torch.logsumexp(others, dim=-1) - torch.logsumexp(logits, dim=-1, keepdim=True)


@dataclass
class MStepSums:
    """The M-step's sufficient statistics, (J, K) each, summed over items."""

    mu_y: torch.Tensor  # sum_i mu_i y_ij
    mu: torch.Tensor  # sum_i mu_i, over the items j labelled
    not_mu_not_y: torch.Tensor  # sum_i (1 - mu_i)(1 - y_ij)
    not_mu: torch.Tensor  # sum_i (1 - mu_i)

    @classmethod
    def zeros(cls, n_annotators: int, n_classes: int) -> MStepSums:
        return cls(*(torch.zeros(n_annotators, n_classes, dtype=torch.float64)
                     for _ in range(4)))

    @classmethod
    def of(cls, mu: torch.Tensor, y: torch.Tensor, labelled: torch.Tensor) -> MStepSums:
        """The sums over the items of ``mu`` (M, K), ``y`` (M, J, K), ``labelled`` (M, J)."""
        mu, y, labelled = mu.double(), y.double(), labelled.double()
        nmu = 1 - mu
        return cls(torch.einsum("mk,mjk->jk", mu, y).cpu(),
                   torch.einsum("mk,mj->jk", mu, labelled).cpu(),
                   torch.einsum("mk,mjk->jk", nmu, labelled[..., None] - y).cpu(),
                   torch.einsum("mk,mj->jk", nmu, labelled).cpu())

    def __iadd__(self, other: MStepSums) -> MStepSums:
        for f in dataclasses.fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))
        return self

    def estimate(self, alpha: torch.Tensor, beta: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        """The M-step: new (alpha, beta), clipped; the old value where a sum is empty."""
        new_a = torch.where(self.mu > 0, self.mu_y / self.mu.clamp(min=1e-300), alpha)
        new_b = torch.where(self.not_mu > 0, self.not_mu_not_y / self.not_mu.clamp(min=1e-300),
                            beta)
        return new_a.clamp(eps, 1 - eps), new_b.clamp(eps, 1 - eps)

    def as_dict(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


def spammer_scores(alpha: npt.ArrayLike, beta: npt.ArrayLike) -> Floats:
    """``(alpha + beta - 1)^2``: 0 where an annotator's answer ignores the truth (a
    coin, or always "yes": alpha 1, beta 0), 1 for a perfect (or perfectly inverted) one."""
    s: Floats = (np.asarray(alpha, np.float64) + np.asarray(beta, np.float64) - 1) ** 2
    return s


def vote_share_sums(votes: torch.Tensor, n_classes: int) -> MStepSums:
    """The M-step's sums with each item's vote shares as ``mu`` (the initialisation)."""
    y, labelled = one_hot_votes(votes, n_classes)
    count = labelled.sum(1, keepdim=True)
    mu = y.sum(1) / count.clamp(min=1)
    return MStepSums.of(mu, y, labelled)


def gold_sums(votes: torch.Tensor, n_classes: int, gold: int) -> MStepSums:
    """The M-step's sums with annotator ``gold``'s answers as the truth (``mu`` one-hot),
    over the items it labelled: every annotator's agreement with the gold standard."""
    y, labelled = one_hot_votes(votes, n_classes)
    has_gold = labelled[:, gold] > 0
    return MStepSums.of(y[has_gold, gold], y[has_gold], labelled[has_gold])


@dataclass
class EMResult:
    mu: torch.Tensor  # (M, K) one-vs-all posteriors
    alpha: torch.Tensor  # (J, K)
    beta: torch.Tensor
    prior: torch.Tensor  # (K,)
    rounds: int


def em_aggregate(votes: npt.NDArray[np.integer[Any]], n_classes: int, *, rounds: int = 50,
                 eps: float = DEFAULT_EPS, tol: float = 1e-6) -> EMResult:
    """EM without a network (Dawid-Skene / Raykar with a class prior as ``p``): items
    (M, J) of votes -> posteriors and annotators. Started from the majority vote; stops
    when no alpha or beta moves by more than ``tol``. What :class:`AggNet` does inside
    training, with the network's probabilities in place of the prior."""
    v = torch.from_numpy(np.asarray(votes, np.int64))
    y, labelled = one_hot_votes(v, n_classes)
    j = v.shape[1]
    alpha, beta = vote_share_sums(v, n_classes).estimate(
        torch.full((j, n_classes), 0.5, dtype=torch.float64),
        torch.full((j, n_classes), 0.5, dtype=torch.float64), eps)
    prior = (y.sum(1) / labelled.sum(1, keepdim=True).clamp(min=1)).double().mean(0)
    mu = torch.zeros(len(v), n_classes, dtype=torch.float64)
    done = 0
    while done < rounds:
        done += 1
        p = prior.clamp(eps, 1 - eps)
        log_a, log_b = log_likelihoods(y.double(), labelled.double(), alpha, beta)
        mu = posterior(log_a, log_b, torch.log(p), torch.log1p(-p))
        new_a, new_b = MStepSums.of(mu, y, labelled).estimate(alpha, beta, eps)
        prior = mu[labelled.sum(1) > 0].mean(0)
        moved = max(float((new_a - alpha).abs().max()), float((new_b - beta).abs().max()))
        alpha, beta = new_a, new_b
        if moved < tol:
            break
    return EMResult(mu, alpha, beta, prior, done)


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor,
                       weight: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy of ``logits`` (M, K) against distributions ``target`` (M, K), with
    class weights as ``nn.CrossEntropyLoss`` applies them (a weighted mean), so that
    one-hot targets give exactly its value."""
    w = target if weight is None else target * weight
    return -(w * logits.log_softmax(-1)).sum() / w.sum().clamp(min=1e-12)
