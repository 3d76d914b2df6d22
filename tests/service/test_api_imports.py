"""The API process reads model cards without torch: importing the app must not load it.

A fresh interpreter, because this test session itself has imported torch long before.
"""

from __future__ import annotations

import json
import subprocess
import sys

HEAVY = ("torch", "torchvision", "segmentation_models_pytorch", "timm")


def test_importing_the_api_loads_no_torch() -> None:
    code = (
        "import json, sys\n"
        "import service.app\n"
        "app = service.app.create_app()\n"
        f"print(json.dumps({{m: m in sys.modules for m in {HEAVY!r}}}))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    loaded = json.loads(done.stdout.strip().splitlines()[-1])
    assert loaded == {m: False for m in HEAVY}, f"the API imported {loaded}"


def test_listing_models_loads_no_torch() -> None:
    """``GET /v1/models`` and job checks go through the torch-free catalogue."""
    code = (
        "import sys\n"
        "from models.catalogue import list_model_cards, resolve_card\n"
        "from workers.jobs.actions import check_model\n"
        "assert [c.name for c in list_model_cards()][:2] == ['identity', 'unet']\n"
        "check_model('joint', None)\n"
        "assert resolve_card('cyclegan').architecture == 'cyclegan'\n"
        "print('torch' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "False"
