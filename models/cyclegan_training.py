"""Training the stain-transforming CycleGAN (de Bel et al., MIDL 2019), CPU or CUDA.

Two generators (A->B, B->A) and two 70 x 70 PatchGAN discriminators, trained as Zhu et
al.'s CycleGAN with the choices of de Bel et al.: least-squares (MSE) adversarial loss,
L1 cycle-consistency loss (weight ``lambda_cycle``), and an L1 identity loss whose weight
decays linearly from ``lambda_identity`` to 0 over the first ``identity_decay_epochs``
epochs (it keeps colours put while the discriminators are still weak, then lets the
generators move the stain). Fakes shown to the discriminators come from a history pool
of 50 images; patches are flipped and rotated by multiples of 90 degrees (no colour
augmentation: colour is what is being learned).

Data come from two sampler callables, ``(rng, n) -> (n, p, p, 3) uint8``, that the
caller builds (from slides or tile folders, in ``workers``); this module does no file
I/O except reading and writing its own checkpoints.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from models.card import ModelCard
from models.catalogue import cyclegan_card
from models.cyclegan import Generator, PatchDiscriminator, StainTransformer
from models.errors import CheckpointUnreadable

log = logging.getLogger(__name__)

#: (rng, n) -> n uint8 RGB patches of the configured size.
Patches = npt.NDArray[np.uint8]  # (n, h, w, 3) RGB
PatchSampler = Callable[[np.random.Generator, int], Patches]
DIRECTIONS = ("a2b", "b2a")


@dataclass(frozen=True)
class CycleGANConfig:
    """Hyper-parameters; the defaults are the paper's (CPU runs shrink them)."""

    depth: int = 3
    base_filters: int = 32
    residual_blocks: int = 1
    disc_filters: int = 64
    patch_px: int = 256
    batch_size: int = 1
    epochs: int = 50
    steps_per_epoch: int = 500
    lr: float = 2e-4
    beta1: float = 0.5
    lambda_cycle: float = 10.0
    lambda_identity: float = 5.0
    identity_decay_epochs: float = 20.0
    #: Linear learning-rate decay to 0 over the last ``lr_decay_epochs`` epochs.
    lr_decay_epochs: int = 0
    pool_size: int = 50
    #: > 0: the generators used for validation and export are an exponential moving
    #: average of the trained ones (decay per step), which damps the GAN's oscillation.
    ema_decay: float = 0.0
    augment: bool = True
    seed: int = 0
    device: str = "cpu"

    def validate(self) -> None:
        if self.patch_px % 2**self.depth or self.patch_px < 16:
            raise ValueError(f"patch_px={self.patch_px} must be a multiple of 2**depth and >= 16")
        if self.epochs < 1 or self.steps_per_epoch < 1 or self.batch_size < 1:
            raise ValueError("epochs, steps_per_epoch and batch_size must be positive")
        if self.identity_decay_epochs < 0 or self.lr <= 0:
            raise ValueError("identity_decay_epochs must be >= 0 and lr > 0")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CycleGANConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def identity_weight(config: CycleGANConfig, epoch_progress: float) -> float:
    """``lambda_identity`` at epoch 0, linearly down to 0 at ``identity_decay_epochs``."""
    if config.identity_decay_epochs <= 0:
        return 0.0
    return config.lambda_identity * max(0.0, 1.0 - epoch_progress / config.identity_decay_epochs)


class ImagePool:
    """Zhu et al.'s history of generated images: half the time an older fake is shown."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.images: list[torch.Tensor] = []

    def query(self, images: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        if self.size == 0:
            return images
        out = []
        for image in images.detach():
            image = image.unsqueeze(0)
            if len(self.images) < self.size:
                self.images.append(image.clone())
                out.append(image)
            elif rng.random() < 0.5:
                i = int(rng.integers(self.size))
                out.append(self.images[i].clone())
                self.images[i] = image.clone()
            else:
                out.append(image)
        return torch.cat(out)


def to_unit_tanh(batch: Patches, device: torch.device) -> torch.Tensor:
    """(n, h, w, 3) uint8 -> (n, 3, h, w) float in [-1, 1]."""
    x = torch.from_numpy(np.ascontiguousarray(batch)).to(device).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1.0


def from_unit_tanh(x: torch.Tensor) -> Patches:
    """(n, 3, h, w) in [-1, 1] -> (n, h, w, 3) uint8."""
    y = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    out: Patches = y.permute(0, 2, 3, 1).cpu().numpy()
    return out


def augment(batch: Patches, rng: np.random.Generator) -> Patches:
    out = np.empty_like(batch)
    for i, patch in enumerate(batch):
        patch = np.rot90(patch, int(rng.integers(4)))
        out[i] = patch[:, ::-1] if rng.random() < 0.5 else patch
    return out


class CycleGANTrainer:
    """Both generators, both discriminators, their optimisers and the training state."""

    def __init__(self, config: CycleGANConfig) -> None:
        config.validate()
        self.config = config
        self.device = torch.device(config.device)
        torch.manual_seed(config.seed)
        self.rng = np.random.default_rng(config.seed)
        shape = {"depth": config.depth, "base_filters": config.base_filters,
                 "residual_blocks": config.residual_blocks}
        self.g_ab, self.g_ba = Generator(**shape), Generator(**shape)
        self.d_a = PatchDiscriminator(config.disc_filters)
        self.d_b = PatchDiscriminator(config.disc_filters)
        for net in (self.g_ab, self.g_ba, self.d_a, self.d_b):
            net.apply(_init_weights)
            net.to(self.device)
        betas = (config.beta1, 0.999)
        self.opt_g = torch.optim.Adam([*self.g_ab.parameters(), *self.g_ba.parameters()],
                                      lr=config.lr, betas=betas)
        self.opt_d = torch.optim.Adam([*self.d_a.parameters(), *self.d_b.parameters()],
                                      lr=config.lr, betas=betas)
        self.pool_a, self.pool_b = ImagePool(config.pool_size), ImagePool(config.pool_size)
        self.ema: dict[str, Generator] = {}
        if config.ema_decay > 0:
            for name, g in (("g_ab", self.g_ab), ("g_ba", self.g_ba)):
                self.ema[name] = copy.deepcopy(g).eval().requires_grad_(False)
        self.epoch = 0  # completed epochs
        self.step = 0  # completed steps in all
        self.history: list[dict[str, Any]] = []  # one entry per finished epoch
        self.mse, self.l1 = nn.MSELoss(), nn.L1Loss()

    # -- one step -------------------------------------------------------------------------
    def _set_lr(self, epoch_progress: float) -> None:
        c = self.config
        factor = 1.0
        if c.lr_decay_epochs > 0:
            start = c.epochs - c.lr_decay_epochs
            factor = min(1.0, max(0.0, 1.0 - (epoch_progress - start) / c.lr_decay_epochs))
        for opt in (self.opt_g, self.opt_d):
            for group in opt.param_groups:
                group["lr"] = c.lr * factor

    def train_step(self, batch_a: Patches, batch_b: Patches) -> dict[str, float]:
        """One generator and one discriminator update on uint8 patch batches."""
        c = self.config
        progress = self.step / c.steps_per_epoch
        self._set_lr(progress)
        w_idt = identity_weight(c, progress)
        if c.augment:
            batch_a, batch_b = augment(batch_a, self.rng), augment(batch_b, self.rng)
        real_a, real_b = to_unit_tanh(batch_a, self.device), to_unit_tanh(batch_b, self.device)
        for net in (self.g_ab, self.g_ba, self.d_a, self.d_b):
            net.train()

        # generators: fool the discriminators, close the cycle, (early on) keep identity
        for d in (self.d_a, self.d_b):
            d.requires_grad_(False)
        fake_b, fake_a = self.g_ab(real_a), self.g_ba(real_b)
        pred_fb, pred_fa = self.d_b(fake_b), self.d_a(fake_a)
        adv = self.mse(pred_fb, torch.ones_like(pred_fb)) + self.mse(pred_fa, torch.ones_like(pred_fa))
        cycle = self.l1(self.g_ba(fake_b), real_a) + self.l1(self.g_ab(fake_a), real_b)
        loss_g = adv + c.lambda_cycle * cycle
        idt = torch.zeros((), device=self.device)
        if w_idt > 0:
            idt = self.l1(self.g_ab(real_b), real_b) + self.l1(self.g_ba(real_a), real_a)
            loss_g = loss_g + w_idt * idt
        self.opt_g.zero_grad(set_to_none=True)
        torch.autograd.backward(loss_g)
        self.opt_g.step()
        if self.ema:
            with torch.no_grad():
                for name, avg in self.ema.items():
                    for p_avg, p in zip(avg.parameters(), getattr(self, name).parameters()):
                        p_avg.lerp_(p, 1.0 - c.ema_decay)

        # discriminators: real -> 1, (pooled) fake -> 0, halved as in CycleGAN
        for d in (self.d_a, self.d_b):
            d.requires_grad_(True)
        loss_d = torch.zeros((), device=self.device)
        for d, real, fake, pool in ((self.d_a, real_a, fake_a, self.pool_a),
                                    (self.d_b, real_b, fake_b, self.pool_b)):
            pred_real = d(real)
            pred_fake = d(pool.query(fake, self.rng))
            loss_d = loss_d + 0.5 * (self.mse(pred_real, torch.ones_like(pred_real))
                                     + self.mse(pred_fake, torch.zeros_like(pred_fake)))
        self.opt_d.zero_grad(set_to_none=True)
        torch.autograd.backward(loss_d)
        self.opt_d.step()
        self.step += 1
        return {"loss_g": loss_g.item(), "adv": adv.item(), "cycle": cycle.item(),
                "identity": idt.item(), "identity_weight": w_idt, "loss_d": loss_d.item()}

    # -- the loop -------------------------------------------------------------------------
    def fit(
        self,
        sample_a: PatchSampler,
        sample_b: PatchSampler,
        *,
        on_step: Callable[[int, dict[str, float]], None] | None = None,
        on_epoch: Callable[[CycleGANTrainer, dict[str, Any]], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> list[dict[str, Any]]:
        """Train from the current state to ``config.epochs``; returns the epoch history.

        ``on_epoch`` runs after every epoch (evaluate, log, checkpoint); a resumed
        trainer continues at the step it was saved at.
        """
        c = self.config
        while self.epoch < c.epochs:
            sums: dict[str, float] = {}
            in_epoch = self.step - self.epoch * c.steps_per_epoch
            for _ in range(in_epoch, c.steps_per_epoch):
                if should_stop is not None and should_stop():
                    return self.history
                n = c.batch_size
                losses = self.train_step(sample_a(self.rng, n), sample_b(self.rng, n))
                for key, value in losses.items():
                    sums[key] = sums.get(key, 0.0) + value
                if on_step is not None:
                    on_step(self.step, losses)
            self.epoch += 1
            done = max(1, c.steps_per_epoch - in_epoch)
            record: dict[str, Any] = {"epoch": self.epoch, "step": self.step,
                                      **{k: v / done for k, v in sums.items()}}
            self.history.append(record)
            if on_epoch is not None:
                on_epoch(self, record)
        return self.history

    # -- inference helpers ------------------------------------------------------------------
    def generator(self, direction: str) -> Generator:
        """The generator of ``direction`` that is validated and exported (the moving
        average when ``ema_decay`` > 0)."""
        if direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
        name = "g_ab" if direction == "a2b" else "g_ba"
        return self.ema.get(name) or getattr(self, name)

    def card(self, name: str, direction: str, *, target_mpp: float,
             domain_names: tuple[str, str] = ("A", "B"), **geometry: Any) -> ModelCard:
        """The model card of one direction (weights saved beside it as safetensors)."""
        source, target = domain_names if direction == "a2b" else domain_names[::-1]
        c = self.config
        return cyclegan_card(
            name, target_mpp=target_mpp, depth=c.depth, base_filters=c.base_filters,
            residual_blocks=c.residual_blocks, weights="weights.safetensors",
            description=(f"Stain-transforming CycleGAN generator (de Bel et al., MIDL 2019) "
                         f"from domain {source!r} to domain {target!r}, trained "
                         f"{self.epoch} epochs / {self.step} steps on {c.patch_px} px patches."),
            extra_params={"direction": direction, "source_domain": source,
                          "target_domain": target, "trained_epochs": self.epoch,
                          "trained_steps": self.step},
            **geometry,
        )

    def inference_module(self, direction: str) -> StainTransformer:
        """The generator wrapped as the engine runs it (state dict keys ``generator.*``)."""
        return StainTransformer(self.generator(direction))

    # -- checkpoints ------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "config": asdict(self.config),
            "epoch": self.epoch,
            "step": self.step,
            "history": self.history,
            "g_ab": self.g_ab.state_dict(), "g_ba": self.g_ba.state_dict(),
            "d_a": self.d_a.state_dict(), "d_b": self.d_b.state_dict(),
            "opt_g": self.opt_g.state_dict(), "opt_d": self.opt_d.state_dict(),
            "pool_a": [t.cpu() for t in self.pool_a.images],
            "pool_b": [t.cpu() for t in self.pool_b.images],
            "rng": self.rng.bit_generator.state,
            "torch_rng": torch.get_rng_state(),
            "ema": {name: g.state_dict() for name, g in self.ema.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("g_ab", "g_ba", "d_a", "d_b"):
            getattr(self, key).load_state_dict(state[key])
        self.opt_g.load_state_dict(state["opt_g"])
        self.opt_d.load_state_dict(state["opt_d"])
        self.pool_a.images = [t.to(self.device) for t in state["pool_a"]]
        self.pool_b.images = [t.to(self.device) for t in state["pool_b"]]
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
        self.history = list(state["history"])
        self.rng.bit_generator.state = state["rng"]
        torch.set_rng_state(state["torch_rng"])
        for name, avg in self.ema.items():  # a checkpoint without averages starts them now
            avg.load_state_dict(state.get("ema", {}).get(name, getattr(self, name).state_dict()))

    def save_checkpoint(self, path: Path) -> None:
        """Write the whole training state atomically (a temporary file, then rename)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.partial")
        torch.save(self.state_dict(), tmp)
        os.replace(tmp, path)

    @classmethod
    def from_checkpoint(cls, path: Path, **overrides: Any) -> CycleGANTrainer:
        """A trainer restored from ``path``; ``overrides`` may change e.g. ``epochs``
        or ``device``, never the networks' shapes."""
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=False)
        except Exception as err:
            raise CheckpointUnreadable(f"cannot read checkpoint {str(path)!r}: {err}") from err
        config = CycleGANConfig.from_dict({**state["config"], **overrides})
        shapes = ("depth", "base_filters", "residual_blocks", "disc_filters")
        changed = [k for k in shapes if getattr(config, k) != state["config"][k]]
        if changed:
            raise CheckpointUnreadable(f"checkpoint {str(path)!r} has other network shapes: "
                                       f"{', '.join(changed)} differ")
        trainer = cls(config)
        trainer.load_state_dict(state)
        return trainer


def _init_weights(module: nn.Module) -> None:
    """N(0, 0.02) convolutions, as pix2pix/CycleGAN initialise them."""
    if isinstance(module, nn.Conv2d):
        nn.init.normal_(module.weight, 0.0, 0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


@torch.inference_mode()
def transform_image(
    generator: Generator | StainTransformer, rgb: npt.NDArray[np.uint8], *,
    device: str = "cpu", tile_px: int = 0,
) -> npt.NDArray[np.uint8]:
    """Run one generator over an (h, w, 3) uint8 image in one pass (``tile_px=0``) or in
    non-overlapping tiles (for comparison), reflect-padded to its multiple."""
    generator = generator.to(device).eval()
    module = generator if isinstance(generator, StainTransformer) else StainTransformer(generator)
    h, w = rgb.shape[:2]
    if tile_px <= 0:
        x = to_unit_tanh(rgb[None], torch.device(device))
        y = module(x)  # [0, 1]
        rgb_out = (y.clamp(0, 1) * 255).round().to(torch.uint8)[0].permute(1, 2, 0)
        image: npt.NDArray[np.uint8] = rgb_out.cpu().numpy()
        return image
    out = np.empty_like(rgb)
    for y0 in range(0, h, tile_px):
        for x0 in range(0, w, tile_px):
            part = rgb[y0 : y0 + tile_px, x0 : x0 + tile_px]
            out[y0 : y0 + part.shape[0], x0 : x0 + part.shape[1]] = transform_image(
                module, part, device=device)
    return out
