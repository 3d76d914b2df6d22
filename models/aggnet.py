"""AggNet's EM inside training (``models.seg_training.fit(crowd=AggNet(...))``).

The E-step runs on every training batch with the network's current (detached)
probabilities; its posteriors ``mu`` are both the batch's soft targets and the sufficient
statistics of the next M-step, which runs every ``em_every`` steps (an "epoch" of EM):
no extra pass over the data, and the annotators' masks go through the same augmentation
as the images. The network's loss is cross-entropy against ``mu`` normalised over the
classes: for two classes that is AggNet's ``-sum_i [mu_i ln(p_i a_i) + (1 - mu_i)
ln((1 - p_i) b_i)]`` up to terms that do not depend on the network, and with one-hot
targets it is exactly the product's weighted cross-entropy, so that a majority vote and
AggNet differ only in their targets. ``alpha`` and ``beta`` start from the majority vote
(the M-step with each item's vote shares as ``mu``, as Raykar et al. initialise).
Optionally one annotator is a gold standard: its answers count as the truth, and every
other annotator's estimates are pulled towards its agreement with them (``gold_weight``
tau: ``alpha <- (1 - tau) alpha + tau gamma``, gamma its sensitivity measured on the
gold standard's items; beta alike).

The EM itself (likelihoods, posteriors, M-step sums, spammer scores) is ``models.crowd``.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from models.crowd import (
    DEFAULT_EPS,
    CrowdLabels,
    Floats,
    MStepSums,
    gold_sums,
    log_likelihoods,
    log_one_minus_softmax,
    majority_vote,
    one_hot_votes,
    posterior,
    soft_cross_entropy,
    spammer_scores,
    vote_share_sums,
)
from models.patches import Index, TrainingDataInvalid

log = logging.getLogger(__name__)


class _Level:
    """The annotator model of one kind of item (pixels or tiles): alpha, beta (J, K), the
    sums of the current EM round, and the gold standard's agreement sums if any."""

    def __init__(self, n_annotators: int, n_classes: int, eps: float) -> None:
        self.alpha = torch.full((n_annotators, n_classes), 0.5, dtype=torch.float64)
        self.beta = self.alpha.clone()
        self.sums = MStepSums.zeros(n_annotators, n_classes)
        #: each class's share of the items under the current targets (summed posteriors)
        self.mass = torch.zeros(n_classes, dtype=torch.float64)
        self.weights = torch.ones(n_classes, dtype=torch.float64)
        self.gold: tuple[float, Floats, Floats] | None = None  # (tau, gamma_a, gamma_b)
        self.eps = eps
        self.labelled = np.zeros(n_annotators, np.int64)

    def m_step(self, sums: MStepSums, gold: int | None) -> None:
        alpha, beta = sums.estimate(self.alpha, self.beta, self.eps)
        if self.gold is not None:
            tau, ga, gb = self.gold
            alpha = torch.where(torch.from_numpy(np.isfinite(ga)),
                                (1 - tau) * alpha + tau * torch.from_numpy(np.nan_to_num(ga)),
                                alpha).clamp(self.eps, 1 - self.eps)
            beta = torch.where(torch.from_numpy(np.isfinite(gb)),
                               (1 - tau) * beta + tau * torch.from_numpy(np.nan_to_num(gb)),
                               beta).clamp(self.eps, 1 - self.eps)
        if gold is not None:  # the gold standard is the truth
            alpha[gold], beta[gold] = 1 - self.eps, 1 - self.eps
        self.alpha, self.beta = alpha, beta
        if float(self.mass.sum()) > 0:  # the product's class weights, of these targets
            ratio = self.mass.sum() / self.mass.clamp(min=1e-12) / len(self.mass)
            self.weights = torch.where(self.mass > 0, ratio, 0.0) ** 0.5
        self.mass = torch.zeros_like(self.mass)

    def posteriors(self, logits: torch.Tensor,
                   votes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """E-step for items with logits (M, K) and votes (M, J); accumulates the M-step's
        sums; returns (mu (m, K), which of the M items someone labelled), None if none."""
        k = logits.shape[-1]
        y, labelled = one_hot_votes(votes, k)
        keep = labelled.sum(1) > 0
        if not bool(keep.any()):
            return None
        y, labelled, logits = y[keep], labelled[keep], logits[keep].detach().float()
        log_a, log_b = log_likelihoods(y, labelled, self.alpha.to(logits), self.beta.to(logits))
        mu = posterior(log_a, log_b, logits.log_softmax(-1), log_one_minus_softmax(logits))
        self.sums += MStepSums.of(mu, y, labelled)
        self.mass += (mu / mu.sum(1, keepdim=True).clamp(min=1e-12)).sum(0).double().cpu()
        return mu, keep


class AggNet:
    """AggNet's EM inside ``models.seg_training.fit(crowd=...)`` (module docstring):
    pixel-wise on the annotators' masks, tile-wise on their patch labels (``joint``'s
    L_cls), one M-step every ``em_every`` training steps.

    ``crowd`` is aligned with the training :class:`models.patches.PatchDataset`, whose own
    masks and labels hold the majority vote (so that batches, class weights and the
    training Dice mean the same as with one annotator). ``balanced``: L_seg's class
    weights as the product's (``FitConfig.class_weights``), computed from AggNet's own
    targets, not from the majority vote. ``gold``: the name of an annotator whose answers
    are the truth; ``gold_weight`` (tau, 0-1): how far every other annotator's alpha and
    beta are pulled towards its agreement with them.
    """

    def __init__(self, crowd: CrowdLabels, n_classes: int, *, em_every: int = 50,
                 eps: float = DEFAULT_EPS, gold: str | None = None, gold_weight: float = 0.5,
                 balanced: bool = True, chunk: int = 16) -> None:
        if n_classes < 2:
            raise TrainingDataInvalid("learning from several annotators needs two classes")
        if em_every < 1 or not 0 < eps < 0.5 or not 0 <= gold_weight <= 1:
            raise ValueError("em_every >= 1, 0 < eps < 0.5 and 0 <= gold_weight <= 1")
        if gold is not None and gold not in crowd.annotators:
            raise TrainingDataInvalid(f"gold annotator {gold!r} is not one of "
                                      f"{', '.join(crowd.annotators)}")
        self.crowd, self.n_classes, self.em_every = crowd, n_classes, em_every
        self.balanced = balanced
        self.gold = None if gold is None else crowd.annotators.index(gold)
        j = len(crowd.annotators)
        self.pixel, self.tile = _Level(j, n_classes, eps), _Level(j, n_classes, eps)
        self.rounds = 0
        for level, chunks in ((self.pixel, self._pixel_votes(chunk)),
                              (self.tile, iter([torch.from_numpy(crowd.labels)]))):
            init, agree = MStepSums.zeros(j, n_classes), MStepSums.zeros(j, n_classes)
            for votes in chunks:
                init += vote_share_sums(votes, n_classes)
                y, labelled = one_hot_votes(votes, n_classes)
                level.mass += (y.sum(1) / labelled.sum(1, keepdim=True).clamp(min=1)).sum(
                    0).double()
                if self.gold is not None:
                    agree += gold_sums(votes, n_classes, self.gold)
                level.labelled += (one_hot_votes(votes, n_classes)[1].sum(0)).long().numpy()
            if self.gold is not None:
                ga = (agree.mu_y / agree.mu).numpy()
                gb = (agree.not_mu_not_y / agree.not_mu).numpy()
                level.gold = (gold_weight, ga, gb)
            level.m_step(init, self.gold)

    def _pixel_votes(self, chunk: int) -> Iterator[torch.Tensor]:
        masks = self.crowd.masks
        for i in range(0, len(masks), chunk):
            yield torch.from_numpy(masks[i:i + chunk].reshape(-1, masks.shape[-1]))

    @property
    def has_tile_labels(self) -> bool:
        return bool((self.crowd.labels >= 0).any())

    def batch_masks(self, index: Index, masks: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint8]:
        """(B, H, W, 1 + J): a batch's masks with the annotators' behind them, so that one
        call of ``augment`` turns them all alike."""
        stacked: npt.NDArray[np.uint8] = np.concatenate(
            [masks[..., None], self.crowd.masks[index]], axis=-1)
        return stacked

    @staticmethod
    def split_batch(stacked: npt.NDArray[np.uint8],
                    device: torch.device) -> tuple[npt.NDArray[np.uint8], torch.Tensor]:
        """:meth:`batch_masks` after augmentation -> (masks, votes (B, H, W, J) on
        ``device``)."""
        votes = torch.from_numpy(np.ascontiguousarray(stacked[..., 1:])).to(device)
        return stacked[..., 0], votes

    def tile_votes(self, index: Index, device: torch.device) -> torch.Tensor:
        return torch.from_numpy(self.crowd.labels[index]).to(device)

    def seg_loss(self, logits: torch.Tensor, votes: torch.Tensor) -> torch.Tensor:
        """Pixel-wise: ``logits`` (B, K, H, W), ``votes`` (B, H, W, J) -> L_seg against
        the E-step's posteriors (module docstring), with the class weights of the
        product's L_seg (``balanced``) computed from the posteriors of the last EM round
        (at first, from the vote shares) rather than from the majority vote."""
        k = logits.shape[1]
        flat = logits.permute(0, 2, 3, 1).reshape(-1, k)
        flat_votes = votes.reshape(-1, votes.shape[-1])
        found = self.pixel.posteriors(flat, flat_votes)
        if found is None:
            return logits.sum() * 0
        mu, keep = found
        weight = self.pixel.weights.to(flat) if self.balanced else None
        return soft_cross_entropy(flat[keep], mu / mu.sum(1, keepdim=True).clamp(min=1e-12),
                                  weight)

    def label_loss(self, cls_logits: torch.Tensor, votes: torch.Tensor) -> torch.Tensor:
        """Tile-wise: class logits (B, K), the annotators' patch labels (B, J) -> L_cls."""
        found = self.tile.posteriors(cls_logits, votes)
        if found is None:
            return cls_logits.sum() * 0
        mu, keep = found
        return soft_cross_entropy(cls_logits[keep], mu / mu.sum(1, keepdim=True).clamp(min=1e-12))

    def step_done(self, step: int) -> None:
        """After training step ``step`` (1-based): the M-step every ``em_every`` steps."""
        if step % self.em_every:
            return
        for level in (self.pixel, self.tile):
            if float(level.sums.mu.sum() + level.sums.not_mu.sum()) > 0:
                level.m_step(level.sums, self.gold)
            level.sums = MStepSums.zeros(*level.alpha.shape)
        self.rounds += 1
        log.debug("EM round %d: pixel spammer scores %s", self.rounds,
                  np.round(spammer_scores(self.pixel.alpha, self.pixel.beta).mean(1), 3))

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs (tensors and plain values: ``weights_only`` loads)."""
        state: dict[str, Any] = {"rounds": self.rounds}
        for name, level in (("pixel", self.pixel), ("tile", self.tile)):
            state[name] = {"alpha": level.alpha, "beta": level.beta, "mass": level.mass,
                           "weights": level.weights, **level.sums.as_dict()}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rounds = int(state["rounds"])
        for name, level in (("pixel", self.pixel), ("tile", self.tile)):
            level.alpha, level.beta = state[name]["alpha"], state[name]["beta"]
            level.mass, level.weights = state[name]["mass"], state[name]["weights"]
            level.sums = MStepSums(**{f.name: state[name][f.name]
                                      for f in dataclasses.fields(MStepSums)})

    def report(self, classes: Sequence[str],
               levels: Sequence[str] = ("pixel", "tile")) -> list[dict[str, Any]]:
        """Per annotator and level (pixel, tile) it labelled: alpha, beta, S per class
        (``levels``: those the model learned from; a U-Net has no tile level)."""
        return annotator_report(self.crowd.annotators, classes,
                                {k: v for k, v in (("pixel", self.pixel), ("tile", self.tile))
                                 if k in levels})


def annotator_report(annotators: Sequence[str], classes: Sequence[str],
                     levels: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows ``{name, level, labelled, sensitivity, specificity, spammer_score}`` (per
    class) for every annotator with labelled items at a level; ``levels`` maps the
    level's name to an object with ``alpha``, ``beta`` (J, K) and ``labelled`` (J,)."""
    rows = []
    for level_name, level in levels.items():
        alpha = np.asarray(level.alpha, np.float64)
        beta = np.asarray(level.beta, np.float64)
        score = spammer_scores(alpha, beta)
        for j, name in enumerate(annotators):
            if int(level.labelled[j]) == 0:
                continue
            rows.append({"name": name, "level": level_name, "labelled": int(level.labelled[j]),
                         "sensitivity": {c: round(float(v), 4) for c, v in zip(classes, alpha[j])},
                         "specificity": {c: round(float(v), 4) for c, v in zip(classes, beta[j])},
                         "spammer_score": {c: round(float(v), 4)
                                           for c, v in zip(classes, score[j])}})
    return rows


@dataclass
class _Agreement:
    alpha: Floats
    beta: Floats
    labelled: Index


def majority_report(crowd: CrowdLabels, classes: Sequence[str], *,
                    levels: Sequence[str] = ("pixel", "tile"), eps: float = DEFAULT_EPS,
                    chunk: int = 16) -> list[dict[str, Any]]:
    """:func:`annotator_report` of every annotator against the majority vote (the
    M-step once, with the vote as ``mu``): what ``--aggregate majority`` records."""
    k, j = len(classes), len(crowd.annotators)
    found: dict[str, Any] = {}
    for name, votes_list in (
            ("pixel", [crowd.masks[i:i + chunk].reshape(-1, j)
                       for i in range(0, len(crowd), chunk)]),
            ("tile", [crowd.labels])):
        if name not in levels:
            continue
        sums, labelled = MStepSums.zeros(j, k), np.zeros(j, np.int64)
        for v in votes_list:
            votes = torch.from_numpy(np.asarray(v, np.int64))
            mv = torch.from_numpy(majority_vote(v, k, -1))
            y, lab = one_hot_votes(votes, k)
            has = mv >= 0
            sums += MStepSums.of(torch.nn.functional.one_hot(mv[has], k).double(), y[has],
                                 lab[has])
            labelled += lab.sum(0).long().numpy()
        half = torch.full((j, k), 0.5, dtype=torch.float64)
        alpha, beta = sums.estimate(half, half, eps)
        found[name] = _Agreement(alpha.numpy(), beta.numpy(), labelled)
    return annotator_report(crowd.annotators, classes, found)
