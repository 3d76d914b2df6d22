"""``/v1/models``: the model cards the workers can run."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from models.catalogue import list_model_cards
from service.deps import OwnerDep, SettingsDep

router = APIRouter(prefix="/v1/models", tags=["models"])


@router.get("")
def list_models(_: OwnerDep, settings: SettingsDep) -> list[dict[str, Any]]:
    """Built-in cards and the cards under SLIDEPIPE_MODEL_DIR (as the workers see them)."""
    return [card.model_dump(mode="json") for card in list_model_cards(settings.model_dir)]
