"""Make ``import torchvision`` (and so segmentation-models-pytorch) work beside CPU torch.

Why: on our machines torch is the CPU build that lies on disk, while the registry only
has CUDA builds of torchvision. Their compiled ops (``torchvision/_C.so``) link against
``libtorch_cuda`` and do not load; torchvision then dies at import time because
``torchvision/_meta_registrations.py`` registers a fake kernel for the operator
``torchvision::nms`` that nobody defined ("operator torchvision::nms does not exist").
segmentation-models-pytorch needs only torchvision's pure-Python model classes
(``torchvision.models.resnet`` for its ResNet encoders) and timm needs its transforms.

What: only when the plain import fails with exactly that error, we define the two
operator *schemas* that the import registers fakes for (``nms`` and ``qnms``, with the
signatures torchvision's C++ declares) and import again. The operators still have no
kernel: calling ``torchvision.ops.nms`` raises torchvision's own "Couldn't load custom
C++ ops" error. When torchvision imports normally (a matching CPU or CUDA build), this
module does nothing.
"""

from __future__ import annotations

import importlib
import logging
import sys
from types import ModuleType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch.library

log = logging.getLogger(__name__)

_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)
_MISSING_OP = "operator torchvision::"

#: True once the schemas had to be defined in this process.
SHIM_ACTIVE = False
_library: torch.library.Library | None = None  # keeps the Library alive for the process


def _purge_torchvision() -> None:
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]


def ensure_torchvision() -> None:
    """Import torchvision, defining its missing operator schemas if (and only if) needed."""
    global SHIM_ACTIVE, _library
    try:
        importlib.import_module("torchvision")
        return
    except RuntimeError as err:
        if _MISSING_OP not in str(err) or "does not exist" not in str(err):
            raise
        first_error = err
    _purge_torchvision()
    import torch

    # torch.library's Library is not annotated (hence the two no-untyped-call ignores)
    _library = torch.library.Library("torchvision", "DEF")  # type: ignore[no-untyped-call]
    for schema in _SCHEMAS:
        _library.define(schema)  # type: ignore[no-untyped-call]
    SHIM_ACTIVE = True
    log.info(
        "torchvision's compiled ops do not load beside this torch (%s); defined the "
        "schemas of torchvision::nms/qnms so its Python modules import", first_error
    )
    importlib.import_module("torchvision")


def import_smp() -> ModuleType:
    """``segmentation_models_pytorch``, importable beside CPU torch."""
    ensure_torchvision()
    return importlib.import_module("segmentation_models_pytorch")
