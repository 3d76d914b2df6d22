"""The stain-transforming CycleGAN's networks (sizes from de Bel et al., Table 1), its
training state, Macenko normalisation and the stain metrics, on real H&E pixels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from models.architectures import build_module, count_parameters
from models.catalogue import cyclegan_card, resolve_card
from models.cyclegan import Generator, PatchDiscriminator, StainTransformer, receptive_field
from models.cyclegan_training import CycleGANConfig, CycleGANTrainer, identity_weight
from models.loading import load_model, save_weights
from models.macenko import MacenkoNormalizer, StainReference, estimate_stains, restain
from models.stain import HED_FROM_RGB, RGB_FROM_HED
from models.stain_metrics import histogram_wasserstein, seam_energy_ratio, ssim, tissue_pixels

#: de Bel et al., Table 1: generator parameters by depth (millions, rounded).
PAPER_PARAMS_M = {1: 0.11, 2: 0.45, 3: 2.0}
OURS = {1: 111_555, 2: 480_195, 3: 1_954_755}


def other_centre(rgb: np.ndarray) -> np.ndarray:
    """The same tissue with other haematoxylin/eosin vectors (colour deconvolution)."""
    stains = RGB_FROM_HED.copy()
    for row, vec, scale in ((0, (0.40, 0.75, 0.55), 1.4), (1, (0.05, 0.95, 0.30), 1.2)):
        stains[row] = np.array(vec) / np.linalg.norm(vec) * scale
    return restain(rgb, stains, HED_FROM_RGB)


@pytest.fixture(scope="module")
def he(cmu_rgb: np.ndarray) -> np.ndarray:
    """A 600 x 600 px real H&E crop (tissue and some glass)."""
    return np.ascontiguousarray(cmu_rgb[1800:2400, 800:1400])


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_generator_size_matches_the_paper(depth: int) -> None:
    n = count_parameters(Generator(depth=depth))
    assert n == OURS[depth]
    # within 7% of Table 1's rounded figures (depth 2 is the furthest: 0.48 vs 0.45 M)
    assert abs(n / 1e6 - PAPER_PARAMS_M[depth]) / PAPER_PARAMS_M[depth] < 0.07, n


def test_generator_layers_are_the_papers() -> None:
    g = Generator(depth=3)
    kinds = {type(m) for m in g.modules()}
    assert nn.InstanceNorm2d in kinds and nn.LeakyReLU in kinds
    assert nn.ConvTranspose2d not in kinds  # nearest upsampling instead
    ups = [m for m in g.modules() if isinstance(m, nn.Upsample)]
    assert len(ups) == 3 and all(u.mode == "nearest" for u in ups)
    widths = [m.out_channels for m in g.modules() if isinstance(m, nn.Conv2d)]
    assert widths[0] == 32 and max(widths) == 256  # 32 filters doubling per level
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    y = g(x)
    assert y.shape == x.shape and y.min() >= -1 and y.max() <= 1


def test_patchgan_sees_70_pixels() -> None:
    d = PatchDiscriminator()
    assert receptive_field(d) == 70
    assert d(torch.zeros(1, 3, 256, 256)).shape == (1, 1, 30, 30)


def test_identity_loss_weight_decays_to_zero_over_20_epochs() -> None:
    c = CycleGANConfig(lambda_identity=5.0)
    assert identity_weight(c, 0) == 5.0
    assert identity_weight(c, 10) == pytest.approx(2.5)
    assert identity_weight(c, 20) == 0.0 and identity_weight(c, 35) == 0.0


def test_card_builds_the_engine_module(tmp_path: Path) -> None:
    card = cyclegan_card("stain-test", depth=1, base_filters=8, tile_px=256, kept_px=128,
                         stride_px=64, weights="weights.safetensors")
    assert (card.tile_px, card.overlap_px, card.output_crop_px) == (256, 192, 64)
    assert card.outputs[0].channels == "rgb" and card.activation == "none"
    module = build_module(card)
    assert isinstance(module, StainTransformer)
    save_weights(module, tmp_path / "weights.safetensors")
    loaded = load_model(card.model_copy(update={"source": card.save(tmp_path)}))
    out = loaded.module(torch.zeros(3, 3, 250, 250))  # padded to the multiple, cropped back
    assert out.shape == (3, 3, 122, 122) and 0 <= out.min() and out.max() <= 1
    default = resolve_card("cyclegan")
    assert (default.tile_px, default.output_crop_px, default.overlap_px) == (2048, 512, 1536)
    assert count_parameters(build_module(default)) == OURS[3]


def test_checkpoint_resumes_exactly(tmp_path: Path, he: np.ndarray) -> None:
    """Training 4 steps equals training 2, checkpointing, restoring and training 2."""
    torch.set_num_threads(1)
    config = CycleGANConfig(depth=1, base_filters=8, disc_filters=8, patch_px=32, batch_size=2,
                            epochs=2, steps_per_epoch=2, pool_size=3)
    patches = np.stack([he[y : y + 32, x : x + 32] for y in (0, 200, 400) for x in (0, 300)])

    def sampler(rng: np.random.Generator, n: int) -> np.ndarray:
        return patches[rng.integers(0, len(patches), n)]

    straight = CycleGANTrainer(config)
    straight.fit(sampler, sampler)
    first = CycleGANTrainer(config.__class__(**{**config.__dict__, "epochs": 1}))
    first.fit(sampler, sampler)
    first.save_checkpoint(tmp_path / "checkpoint.pt")
    resumed = CycleGANTrainer.from_checkpoint(tmp_path / "checkpoint.pt", epochs=2)
    assert (resumed.epoch, resumed.step) == (1, 2)
    resumed.fit(sampler, sampler)
    assert resumed.step == straight.step == 4
    for a, b in zip(straight.g_ab.state_dict().values(), resumed.g_ab.state_dict().values()):
        torch.testing.assert_close(a, b)


def test_metrics_agree_with_references(he: np.ndarray) -> None:
    from scipy.stats import wasserstein_distance
    from skimage.metrics import structural_similarity

    b = other_centre(he)
    grey = [x.astype(float) @ [0.299, 0.587, 0.114] for x in (he, b)]
    expected = structural_similarity(*grey, data_range=255, gaussian_weights=True, sigma=1.5,
                                     use_sample_covariance=True)
    assert ssim(he, b) == pytest.approx(expected, abs=1e-9)
    w = np.mean([wasserstein_distance(he[..., c].ravel(), b[..., c].ravel()) for c in range(3)])
    assert histogram_wasserstein(he, b) == pytest.approx(w, abs=1e-9)
    assert histogram_wasserstein(he, he) == 0.0 and ssim(he, he) == pytest.approx(1.0)


def test_seam_ratio_sees_tile_offsets(he: np.ndarray) -> None:
    image = he.astype(np.float64)
    borders = np.arange(0, 600, 100)
    assert seam_energy_ratio(image, borders, borders) == pytest.approx(1.0, abs=0.35)
    shifted = image.copy()
    for i, y in enumerate(borders):  # a different brightness per tile row and column
        shifted[y : y + 100] += 30 * (i % 2)
        shifted[:, y : y + 100] += 25 * (i % 3)
    assert seam_energy_ratio(shifted, borders, borders) > 2.0


def test_macenko_recovers_a_stain_change(he: np.ndarray) -> None:
    """The same tissue in another centre's stain: Macenko fitted on each maps one onto
    the other, bringing the colour distance down with the structure intact."""
    b = other_centre(he)
    mask = tissue_pixels(he)
    before = histogram_wasserstein(he, b, mask_a=mask, mask_b=mask)
    normalizer = MacenkoNormalizer(StainReference.from_image(b)).fit(he)
    out = normalizer(he)
    after = histogram_wasserstein(out, b, mask_a=mask, mask_b=mask)
    assert before > 10 and after < before / 3, (before, after)
    assert ssim(out, he) > 0.95
    stains, max_conc = estimate_stains(he)
    assert stains.shape == (3, 2) and np.allclose(np.linalg.norm(stains, axis=0), 1)
    assert stains[0, 0] > stains[0, 1]  # haematoxylin absorbs more red than eosin
    assert np.all(max_conc > 0)
    # the built-in reference and a batch of tiles (the engine's call) work alike
    default = MacenkoNormalizer().fit(he)
    tiles = default(np.stack([he[:256, :256], he[256:512, 256:512]]))
    assert tiles.shape == (2, 256, 256, 3) and tiles.dtype == np.uint8
