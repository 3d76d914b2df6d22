"""The learning experiment (``python -m experiments.joint_vs_masks``) in miniature:
same slides, same protocol, two training steps per arm. The real figures take minutes
(see the README); this checks the protocol itself: every arm sees the same masked
patches, only the joint arm sees the label-only ones, and the held-out slide is
spatially separate."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

from experiments.joint_vs_masks import ExperimentConfig, format_table, run_experiment


def test_experiment_protocol_in_miniature(cmu_svs: Path, tmp_path: Path) -> None:
    config = ExperimentConfig(out_dir=tmp_path, source=cmu_svs, crop=(400, 500, 1000, 1600),
                              mpp=1.0, patch_px=64, train_stride=32, test_stride=64,
                              mask_fraction=0.1, steps=2, batch_size=2, label_batch=2,
                              labels="region", curve_every=1)
    results = run_experiment(config)
    assert json.loads((tmp_path / "results.json").read_text())["summary"] == results["summary"]
    runs = {r["arm"]: r for r in results["runs"]}
    assert set(runs) == {"joint", "joint-max", "joint-presence", "joint-masks-only",
                         "unet-masks-only"}
    n_train = results["train_patches"]["patches"]
    masked = runs["joint"]["train"]["with_mask"]
    assert masked == max(1, round(0.1 * n_train)) and runs["joint"]["train"]["label_only"] == n_train - masked
    assert runs["joint-max"]["train"] == runs["joint-presence"]["train"] == runs["joint"]["train"]
    for arm in ("joint-masks-only", "unet-masks-only"):
        assert runs[arm]["train"] == {"patches": masked, "with_mask": masked, "with_label": 0,
                                      "label_only": 0, "groups": 1}
    # every arm trains on the same masked pixels; their class shares add up to one
    shares = runs["joint"]["masked_class_shares"]
    assert list(shares) == ["background", "stroma", "cellular"]
    assert abs(sum(shares.values()) - 1) < 1e-3
    assert all(run["masked_class_shares"] == shares for run in runs.values())
    # the training patches overlap (32 px stride at 64 px), so the masked ones cover a
    # larger share of the tissue than of the patch count; the same share in every arm
    area = runs["joint"]["masked_area_share"]
    assert masked / n_train < area < 1
    assert all(run["masked_area_share"] == area for run in runs.values())
    assert all("cls" in runs[arm]["heldout"] for arm in ("joint", "joint-max", "joint-presence"))
    assert "cls" not in runs["unet-masks-only"]["heldout"]
    for run in runs.values():
        assert 0 <= run["heldout"]["seg"]["mean_dice"] <= 1
        # the learning curve ends at the final model's held-out figure
        assert [c["step"] for c in run["curve"]] == [1, 2]
        assert run["curve"][-1]["mean_dice"] == run["heldout"]["seg"]["mean_dice"]
        assert np.isfinite(run["loss_first"]) and np.isfinite(run["loss_last"])
    # two slides: the held-out one is the rows below the training one
    slides = sorted(p.name for p in (tmp_path / "slides").iterdir())
    assert slides == ["heldout.mask.png", "heldout.svs", "train.mask.png", "train.svs"]
    assert results["heldout_patches"]["patches"] > 0
    table = format_table(results["summary"])
    assert table.count("\n") == 6 and "background / stroma / cellular" in table


def test_command_line_builds_the_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """``python -m experiments.joint_vs_masks`` (click): the label set picks the
    resolution, strides and label rule unless given; ``--upper-bounds`` adds arms."""
    from experiments import joint_vs_masks

    seen: list[ExperimentConfig] = []

    def fake_run(config: ExperimentConfig) -> dict[str, Any]:
        seen.append(config)
        return {"train_patches": {}, "train_label_counts": [], "heldout_patches": {},
                "heldout_label_counts": [], "summary": []}

    monkeypatch.setattr(joint_vs_masks, "run_experiment", fake_run)
    result = CliRunner().invoke(joint_vs_masks.main, [
        "--out", str(tmp_path), "--labels", "region", "--seeds", "1,2", "--label-bn", "shared",
        "--arms", "joint,unet-masks-only", "--upper-bounds", "--schedule", "cosine"])
    assert result.exit_code == 0, result.output
    config = seen[0]
    assert (config.out_dir, config.mpp, config.train_stride, config.test_stride) == (
        tmp_path, 1.0, 32, 64)
    assert config.label_rule == (0.0, 0.5, 0.2) and config.seeds == (1, 2)
    assert config.label_bn == "shared" and config.lr_schedule == "cosine"
    assert config.arms == ("joint", "unet-masks-only", "joint-all-masks", "unet-all-masks")
    assert (config.steps, config.batch_size, config.label_batch, config.mask_fraction) == (
        80, 8, 8, 0.03)
    CliRunner().invoke(joint_vs_masks.main, ["--out", str(tmp_path)])
    assert (seen[1].mpp, seen[1].train_stride, seen[1].label_rule) == (0.5, 64, (0.0, 0.5, 0.15))
    assert seen[1].arms == joint_vs_masks.ARMS and seen[1].label_bn == "masked-running"
    wrong = CliRunner().invoke(joint_vs_masks.main, ["--label-bn", "mixed"])
    assert wrong.exit_code == 2 and len(seen) == 2
