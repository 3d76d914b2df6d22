"""Labels from several annotators (``models.crowd``): AggNet's E-step and M-step against
numbers worked out by hand, EM recovering simulated annotators, spammer scores, the
majority vote with missing labels, and the EM inside ``fit`` (resumable, on real tissue)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from models.aggnet import AggNet, majority_report
from models.architectures import build_module
from models.card import ClassSpec, ModelCard
from models.catalogue import BUILTIN_CARDS
from models.crowd import (
    CrowdLabels,
    MStepSums,
    em_aggregate,
    log_likelihoods,
    log_one_minus_softmax,
    majority_vote,
    one_hot_votes,
    posterior,
    soft_cross_entropy,
    spammer_scores,
)
from models.metrics import IGNORE
from models.patches import PatchDataset
from models.seg_training import FitConfig, fit

M = -1  # a missing tile label


def _rates(alpha: list[float], beta: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """Two classes, one-vs-all: class 1 has the given rates, class 0 the mirror ones."""
    a, b = torch.tensor(alpha, dtype=torch.float64), torch.tensor(beta, dtype=torch.float64)
    return torch.stack([b, a], 1), torch.stack([a, b], 1)


def test_e_step_by_hand() -> None:
    # annotators with alpha 0.9, 0.6 and beta 0.8, 0.7 say "yes" and "no"; the network
    # says p = 0.3: a = 0.9 * (1 - 0.6) = 0.36, b = (1 - 0.8) * 0.7 = 0.14,
    # mu = 0.36 * 0.3 / (0.36 * 0.3 + 0.14 * 0.7) = 0.108 / 0.206
    alpha, beta = _rates([0.9, 0.6], [0.8, 0.7])
    y, labelled = one_hot_votes(torch.tensor([[1, 0], [1, IGNORE], [IGNORE, IGNORE]]), 2)
    log_a, log_b = log_likelihoods(y.double(), labelled.double(), alpha, beta)
    assert math.isclose(log_a[0, 1].exp().item(), 0.36)
    assert math.isclose(log_b[0, 1].exp().item(), 0.14)
    p = torch.tensor([[0.7, 0.3]] * 3, dtype=torch.float64)
    mu = posterior(log_a, log_b, p.log(), (1 - p).log())
    assert math.isclose(mu[0, 1].item(), 0.108 / 0.206, rel_tol=1e-12)
    # the second annotator did not label item 1: a = 0.9, b = 0.2 -> 0.27 / (0.27 + 0.14)
    assert math.isclose(mu[1, 1].item(), 0.27 / 0.41, rel_tol=1e-12)
    # nobody labelled item 2: no evidence, the posterior is the network's probability
    assert math.isclose(mu[2, 1].item(), 0.3, rel_tol=1e-12)
    # two classes: the one-vs-all posteriors of the two classes add up to one
    assert torch.allclose(mu.sum(1), torch.ones(3, dtype=torch.float64))


def test_m_step_by_hand() -> None:
    # items with mu 0.8, 0.2, 0.5; annotator 0 says 1, 0, 1; annotator 1 says 1, 1 and
    # leaves item 2 out. alpha_0 = (0.8 + 0.5) / 1.5, beta_0 = 0.8 * 1 / 1.5;
    # alpha_1 = (0.8 + 0.2) / 1.0 = 1 and beta_1 = 0 / 1.0 = 0, clipped into [eps, 1 - eps]
    mu = torch.tensor([[0.2, 0.8], [0.8, 0.2], [0.5, 0.5]], dtype=torch.float64)
    y, labelled = one_hot_votes(torch.tensor([[1, 1], [0, 1], [1, IGNORE]]), 2)
    sums = MStepSums.of(mu, y, labelled)
    assert sums.mu[0, 1].item() == pytest.approx(1.5) and sums.mu[1, 1].item() == pytest.approx(1.0)
    half = torch.full((2, 2), 0.5, dtype=torch.float64)
    alpha, beta = sums.estimate(half, half, eps=1e-3)
    assert alpha[0, 1].item() == pytest.approx(1.3 / 1.5)
    assert beta[0, 1].item() == pytest.approx(0.8 / 1.5)
    assert alpha[1, 1].item() == pytest.approx(1 - 1e-3)
    assert beta[1, 1].item() == pytest.approx(1e-3)
    # class 0 is the mirror: its sensitivity is class 1's specificity
    assert alpha[0, 0].item() == pytest.approx(beta[0, 1].item())


def test_log_space_survives_extreme_logits() -> None:
    logits = torch.tensor([[60.0, 0.0, 0.0], [0.0, 1.0, 2.0]])
    exact = torch.log1p(-logits.double().softmax(-1))
    got = log_one_minus_softmax(logits)
    assert got[0, 0].item() == pytest.approx(math.log(2) - 60, abs=1e-4)  # 1 - p = 2e^-60
    assert torch.log1p(-logits.softmax(-1))[0, 0].item() == -math.inf  # the naive way
    assert torch.allclose(got[1].double(), exact[1], atol=1e-6)
    # a confident network and certain annotators still give finite posteriors
    alpha, beta = _rates([1 - 1e-3] * 3, [1 - 1e-3] * 3)
    y, labelled = one_hot_votes(torch.tensor([[0, 0, 0]]), 2)
    log_a, log_b = log_likelihoods(y.double(), labelled.double(), alpha, beta)
    lg = torch.tensor([[-80.0, 80.0]], dtype=torch.float64)
    mu = posterior(log_a, log_b, lg.log_softmax(-1), log_one_minus_softmax(lg))
    assert torch.isfinite(mu).all() and mu[0, 1].item() > 0.99  # 160 nats beat 3 x 6.9


def test_spammer_scores() -> None:
    assert spammer_scores([0.5, 1.0, 0.0, 0.9, 1.0], [0.5, 0.0, 1.0, 0.8, 1.0]).tolist() == \
        pytest.approx([0.0, 0.0, 0.0, 0.49, 1.0])


def test_majority_vote_with_missing_labels() -> None:
    votes = np.array([[0, 0, 1, IGNORE], [IGNORE] * 4, [1, 2, IGNORE, IGNORE], [2, 2, 2, 0],
                      [IGNORE, 1, IGNORE, IGNORE]], np.uint8)
    # a majority; nobody; a tie (no majority); a majority; a single annotator
    assert majority_vote(votes, 3, IGNORE).tolist() == [0, IGNORE, IGNORE, 2, 1]
    tiles = np.array([[M, 1, 1], [0, M, M], [M, M, M]])
    assert majority_vote(tiles, 2, -1).tolist() == [1, 0, -1]


def test_soft_cross_entropy_is_weighted_cross_entropy_for_one_hot_targets() -> None:
    torch.manual_seed(0)
    logits, target = torch.randn(50, 3), torch.randint(0, 3, (50,))
    weight = torch.tensor([0.5, 2.0, 1.0])
    expected = nn.CrossEntropyLoss(weight=weight)(logits, target)
    got = soft_cross_entropy(logits, nn.functional.one_hot(target, 3).float(), weight)
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)


def _simulate(rng: np.random.Generator, truth: np.ndarray, alpha: float, beta: float,
              missing: float) -> np.ndarray:
    yes = np.where(truth == 1, rng.random(truth.size) < alpha, rng.random(truth.size) > beta)
    return np.where(rng.random(truth.size) < missing, M, yes.astype(np.int64))


def test_em_recovers_simulated_annotators_and_finds_the_spammers() -> None:
    rng = np.random.default_rng(0)
    truth = (rng.random(20000) < 0.3).astype(np.int64)
    # two good, one noisy, a coin and one who always says yes; a third of labels missing
    rates = [(0.9, 0.9), (0.85, 0.9), (0.7, 0.6), (0.5, 0.5), (1.0, 0.0)]
    votes = np.stack([_simulate(rng, truth, a, b, 0.3) for a, b in rates], 1)
    result = em_aggregate(votes, 2, rounds=2000)
    for j in range(len(rates)):
        labelled = votes[:, j] >= 0
        real_a = (votes[labelled & (truth == 1), j] == 1).mean()
        real_b = (votes[labelled & (truth == 0), j] == 0).mean()
        assert result.alpha[j, 1].item() == pytest.approx(real_a, abs=0.03), j
        assert result.beta[j, 1].item() == pytest.approx(real_b, abs=0.03), j
    s = spammer_scores(result.alpha[:, 1], result.beta[:, 1])
    assert s[3] < 0.01 and s[4] < 0.01 and s[:2].min() > 0.5
    # the EM's labels beat the majority vote, which the yes-sayer drags up
    em_right = ((result.mu[:, 1] > 0.5).numpy() == truth).mean()
    mv = majority_vote(votes, 2, -1)
    assert em_right > 0.85 and em_right > (mv == truth).mean() + 0.1


def test_initialisation_is_the_majority_vote_shares() -> None:
    # two annotators, three tiles: (1, 1), (0, 1), (0, missing): shares of class 1 are
    # 1, 0.5, 0: alpha_1 = (1 + 0.5) / 1.5 = 1 (clipped) for annotator 1 (who said 1, 1),
    # alpha_0 = (1 + 0) / 1.5 for annotator 0; beta_0 = (0.5 + 1) / 1.5 = 1 - eps
    labels = np.array([[1, 1], [0, 1], [0, M]])
    masks = np.full((3, 2, 2, 2), IGNORE, np.uint8)
    crowd = CrowdLabels(("a", "b"), masks, labels)
    agg = AggNet(crowd, 2, eps=1e-3)
    assert agg.tile.alpha[0, 1].item() == pytest.approx(1 / 1.5)
    assert agg.tile.alpha[1, 1].item() == pytest.approx(1 - 1e-3)
    assert agg.tile.beta[0, 1].item() == pytest.approx(1 - 1e-3)
    assert agg.tile.labelled.tolist() == [3, 2] and agg.pixel.labelled.tolist() == [0, 0]
    assert [r["level"] for r in agg.report(["no", "yes"])] == ["tile", "tile"]
    # against the hard majority vote instead (what --aggregate majority records)
    rows = majority_report(crowd, ["no", "yes"])
    assert [(r["name"], r["level"]) for r in rows] == [("a", "tile"), ("b", "tile")]
    assert rows[0]["sensitivity"]["yes"] == pytest.approx(1 - 1e-3)  # tile 0 only is "yes"


def test_gold_annotator_pulls_the_others_towards_its_agreement() -> None:
    # "gold" is right on every tile; "liar" always says the opposite, "coin" agrees on two
    # of four. The majority-vote start cannot tell gold from liar; gold's answers can.
    truth = np.array([1, 0, 1, 0])
    labels = np.stack([truth, 1 - truth, np.array([1, 1, 0, 0])], 1)
    crowd = CrowdLabels(("gold", "liar", "coin"), np.full((4, 1, 1, 3), IGNORE, np.uint8),
                        labels)
    plain = AggNet(crowd, 2)
    gold = AggNet(crowd, 2, gold="gold", gold_weight=1.0)
    assert gold.tile.alpha[0, 1].item() == pytest.approx(1 - 1e-3)  # the gold is the truth
    assert gold.tile.alpha[1, 1].item() == pytest.approx(1e-3)  # the liar: never right
    assert gold.tile.alpha[2, 1].item() == pytest.approx(0.5)  # the coin: half
    assert plain.tile.alpha[1, 1].item() == pytest.approx(plain.tile.alpha[0, 1].item())
    with pytest.raises(Exception, match="not one of"):
        AggNet(crowd, 2, gold="nobody")


def test_crowd_labels_join_different_annotators() -> None:
    a = CrowdLabels(("x", "y"), np.zeros((1, 2, 2, 2), np.uint8), np.array([[0, 1]]))
    b = CrowdLabels(("z", "x"), np.ones((2, 2, 2, 2), np.uint8), np.array([[1, 0], [M, 1]]))
    both = CrowdLabels.concat([a, b])
    assert both.annotators == ("x", "y", "z")
    assert both.labels.tolist() == [[0, 1, M], [0, M, 1], [1, M, M]]
    assert (both.masks[0, ..., 2] == IGNORE).all() and (both.masks[1, ..., 1] == IGNORE).all()
    assert both.subset([2]).labels.tolist() == [[1, M, M]]
    assert both.summary()["z"] == {"patches": 2, "pixels": 8}


@pytest.fixture(scope="module")
def crowd_patches(cmu_rgb: np.ndarray) -> tuple[PatchDataset, CrowdLabels]:
    """12 real H&E patches of 32 px, truth by colour deconvolution; a good annotator, a
    yes-sayer and a coin, each labelling about two thirds of the pixels."""
    import cv2

    from models.stain import stain_pseudo_labels

    rng = np.random.default_rng(1)
    # 2 µm/px, where background, stroma and nuclei each cover a fifth or more
    crop = cv2.resize(cmu_rgb[704:1088, 1280:1792], None, fx=0.25, fy=0.25,
                      interpolation=cv2.INTER_AREA)
    labels, _ = stain_pseudo_labels(crop)
    assert (np.bincount(labels.ravel(), minlength=3) > 0.15 * labels.size).all()
    images = np.stack([crop[y:y + 32, x:x + 32] for y in (0, 32, 64) for x in (0, 32, 64, 96)])
    truth = np.stack([labels[y:y + 32, x:x + 32] for y in (0, 32, 64) for x in (0, 32, 64, 96)])
    good = np.where(rng.random(truth.shape) < 0.9, truth, (truth + 1) % 3)
    masks = np.stack([good, np.full_like(truth, 2), rng.integers(0, 3, truth.shape)], -1)
    masks = np.where(rng.random(masks.shape) < 0.33, IGNORE, masks).astype(np.uint8)
    crowd = CrowdLabels(("good", "yes", "coin"), masks, np.full((12, 3), M, np.int64))
    data = PatchDataset.build(images, majority_vote(masks, 3, IGNORE).astype(np.uint8),
                              has_mask=np.ones(12, bool))
    return data, crowd


def _unet() -> ModelCard:
    return BUILTIN_CARDS["unet"].model_copy(update={
        "classes": [ClassSpec(name=n, color="000000") for n in ("bg", "stroma", "nuclei")],
        "tile_px": 32, "target_mpp": 2.0,
        "params": {"encoder_name": "resnet18", "encoder_depth": 3,
                   "decoder_channels": [32, 16, 8]}})


def test_aggnet_inside_fit_resumes_exactly_and_scores_the_spammers(
        crowd_patches: tuple[PatchDataset, CrowdLabels], tmp_path: Path) -> None:
    data, crowd = crowd_patches
    card = _unet()
    config = FitConfig(steps=6, batch_size=4, lr=1e-3, seed=0, checkpoint_every=3)

    def run(steps: int, folder: Path, resume: bool = False) -> tuple[AggNet, nn.Module]:
        torch.manual_seed(0)
        module = build_module(card)
        agg = AggNet(crowd, 3, em_every=2)
        fit(module, card, data, FitConfig(**{**config.__dict__, "steps": steps}),
            checkpoint_dir=folder, resume=resume, crowd=agg)
        return agg, module

    whole, module = run(6, tmp_path / "whole")
    run(3, tmp_path / "split")
    resumed, module2 = run(6, tmp_path / "split", resume=True)
    assert whole.rounds == resumed.rounds == 3
    assert torch.equal(whole.pixel.alpha, resumed.pixel.alpha)
    assert torch.equal(whole.pixel.beta, resumed.pixel.beta)
    for p, q in zip(module.state_dict().values(), module2.state_dict().values()):
        assert torch.equal(p, q)
    s = spammer_scores(whole.pixel.alpha, whole.pixel.beta)
    # the yes-sayer is a spammer by construction (alpha 1, beta 0 for "nuclei", alpha 0,
    # beta 1 for the others); after three rounds with a barely trained network (and two
    # spammers of three annotators), the coin already scores below the good annotator
    assert s[1].max() < 0.01
    assert s[0].mean() > s[2].mean() + 0.05, s
    report = whole.report(["bg", "stroma", "nuclei"])
    assert [r["name"] for r in report] == ["good", "yes", "coin"]
    assert report[1]["sensitivity"]["nuclei"] == pytest.approx(1 - 1e-3)
    assert report[1]["specificity"]["nuclei"] == pytest.approx(1e-3)
