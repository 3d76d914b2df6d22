"""``python -m experiments.stain_transfer`` (click): its options build the experiment's
``Config`` with the same defaults. The experiment itself runs in minutes (its figures
are in docs/experiments/stain_transfer.md); ``tests/workers/engine/test_stain.py`` runs
a quick version of it."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from experiments import stain_transfer
from experiments.stain_transfer import Config


def test_command_line_builds_the_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    seen: list[Config] = []

    def fake_run(config: Config) -> dict[str, Any]:
        seen.append(config)
        return {}

    monkeypatch.setattr(stain_transfer, "run_experiment", fake_run)
    monkeypatch.setattr(stain_transfer, "format_table", lambda results: "table")
    result = CliRunner().invoke(stain_transfer.main, [])
    assert result.exit_code == 0, result.output
    assert result.output == "table\n"
    # every default as the dataclass has it (steps_per_epoch and lr_decay_fraction have
    # no option)
    defaults = Config(out_dir=Path("stain-output"))
    assert seen[0] == defaults
    options = {f.name for f in fields(Config)} - {"steps_per_epoch", "lr_decay_fraction"}
    help_text = CliRunner().invoke(stain_transfer.main, ["--help"]).output
    assert all(f"--{name.replace('_', '-')}" in help_text
               for name in options - {"out_dir"}) and "--out " in help_text
    result = CliRunner().invoke(stain_transfer.main, [
        "--out", str(tmp_path), "--steps", "1500", "--ema-decay", "0", "--resume",
        "--device", "cuda"])
    assert result.exit_code == 0, result.output
    assert seen[1] == Config(out_dir=tmp_path, steps=1500, ema_decay=0.0, resume=True,
                             device="cuda")
