"""Which stain step a job names, checked without torch (the API checks it before queueing).

``stain`` is ``"macenko"`` or the name/path of a ``cyclegan`` model card.
"""

from __future__ import annotations

from pathlib import Path

from models.catalogue import resolve_card
from models.errors import ModelCardInvalid

MACENKO = "macenko"
def stain_kind(stain: str) -> str:
    return MACENKO if stain.strip().lower() == MACENKO else "cyclegan"


def check_stain(stain: str, model_dir: Path | None) -> None:
    """Fail early (before a job is queued) on a stain step that cannot be built."""
    if stain_kind(stain) == MACENKO:
        return
    card = resolve_card(stain, model_dir)
    if card.architecture != "cyclegan":
        raise ModelCardInvalid(
            f"stain step {stain!r} must be 'macenko' or a cyclegan model card, "
            f"not a {card.architecture} model"
        )
