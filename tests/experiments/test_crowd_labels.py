"""The crowd experiment (``python -m experiments.crowd_labels``) in miniature: the same
slides, crowd simulation and arms, two training steps each. The figures take minutes
(docs/experiments/crowd_labels.md); this checks the protocol: simulated annotators have
the rates they were drawn with, the yes-sayer is found a spammer, and every arm is
evaluated on the same held-out patches."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

from experiments.crowd_labels import (
    CrowdConfig,
    format_tables,
    main,
    run_experiment,
    simulate_annotator,
)
from models.metrics import IGNORE


def test_simulated_annotators_have_their_rates() -> None:
    rng = np.random.default_rng(0)
    truth = rng.integers(0, 3, (400, 400)).astype(np.uint8)
    good = simulate_annotator(truth, "good", 3, rng, block_px=4, cover_px=40, coverage=0.5)
    labelled = good != IGNORE
    assert 0.4 < labelled.mean() < 0.6  # half the 100 squares, give or take
    assert (good[labelled] == truth[labelled]).mean() == pytest.approx(0.9, abs=0.02)
    # errors come in blocks: a 4 x 4 block is right or wrong as a whole
    right = (good == truth) | ~labelled
    blocks = right.reshape(100, 4, 100, 4).transpose(0, 2, 1, 3).reshape(100, 100, 16)
    assert (blocks.all(-1) | ~blocks.any(-1)).all()
    yes = simulate_annotator(truth, "yes", 3, rng, block_px=4, cover_px=40, coverage=1.0)
    assert (yes == 2).all()
    coin = simulate_annotator(truth, "random", 3, rng, block_px=1, cover_px=40, coverage=1.0)
    assert (coin == truth).mean() == pytest.approx(1 / 3, abs=0.01)


def test_experiment_protocol_in_miniature(cmu_svs: Path, tmp_path: Path) -> None:
    config = CrowdConfig(out_dir=tmp_path, source=cmu_svs, crop=(400, 500, 1000, 1600),
                         crowds=("good,noisy,yes,yes,random",), seeds=(0,), steps=2,
                         em_every=1, batch_size=2, patch_px=32, train_stride=32,
                         test_stride=32, coverage=0.8)
    results = run_experiment(config)
    assert json.loads((tmp_path / "results.json").read_text())["summary"] == results["summary"]
    assert [(r["arm"], r["crowd"]) for r in results["runs"]] == [
        ("truth", None), ("majority", "good,noisy,yes,yes,random"),
        ("aggnet", "good,noisy,yes,yes,random")]
    for run in results["runs"]:
        assert 0 <= run["heldout"]["mean_dice"] <= 1
        assert set(run["heldout"]["dice"]) == {"background", "stroma", "cellular"}
    crowd = results["crowds"][0]
    assert crowd["annotators"] == ["good1", "noisy1", "random1", "yes1", "yes2"]
    assert crowd["em_rounds"] == 2 and 0 < crowd["majority_accuracy"] <= 1
    rows = {a["name"]: a for a in crowd["aggnet_annotators"]}
    # realised rates, measured against the truth: the good one near 0.9, the yes-sayer
    # always "cellular"; the EM sees the yes-sayers for what they are from the start
    assert rows["good1"]["alpha"]["stroma"] == pytest.approx(0.9, abs=0.1)
    assert rows["yes1"]["alpha"]["cellular"] == 1.0 and rows["yes1"]["beta"]["cellular"] == 0.0
    assert max(rows["yes1"]["spammer_score"].values()) < 0.01
    assert rows["yes2"]["abs_error_alpha"] < 0.01
    assert (tmp_path / "crowds" / "good-noisy-yes-yes-random-seed0" / "train.annotators"
            / "good1.mask.png").is_file()
    table = format_tables(results)
    assert "| good,noisy,yes,yes,random | aggnet |" in table and "yes1 1.00/1.00" in table
    # seeds run side by side in processes are put together from their results.json
    merged = CliRunner().invoke(main, ["--merge", str(tmp_path), "--merge", str(tmp_path)])
    assert merged.exit_code == 0 and "| - | truth | " in merged.output
    assert merged.output.count("yes1 1.00/1.00") == 2


def test_command_line_builds_the_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from experiments import crowd_labels

    seen: list[CrowdConfig] = []

    def fake_run(config: CrowdConfig) -> dict[str, Any]:
        seen.append(config)
        return {"train_patches": {}, "heldout_patches": {}, "summary": [], "crowds": []}

    monkeypatch.setattr(crowd_labels, "run_experiment", fake_run)
    result = CliRunner().invoke(crowd_labels.main, [
        "--out", str(tmp_path), "--crowd", "good,yes", "--crowd", "good,good,random",
        "--seeds", "1,2", "--arms", "majority,aggnet", "--em-every", "10"])
    assert result.exit_code == 0, result.output
    config = seen[0]
    assert config.crowds == ("good,yes", "good,good,random") and config.seeds == (1, 2)
    assert config.arms == ("majority", "aggnet") and config.em_every == 10
    bad = CliRunner().invoke(crowd_labels.main, ["--out", str(tmp_path), "--crowd", "good,lazy"])
    assert bad.exit_code == 2 and "lazy" in bad.output
