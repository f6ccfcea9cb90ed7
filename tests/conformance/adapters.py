"""Every adapter's storefront, and how to start it (the suite runs each case on each).

STOREFRONT_BIN names the axum storefront's binary (default: <repo>/target/debug/storefront);
the Python storefronts run on this interpreter, the Express one on `node` (NODE overrides
it).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Callable, Dict, List

import pytest

REPO = Path(__file__).resolve().parents[2]
EXPRESS_SERVER = REPO / "examples" / "storefront-express" / "server.js"


def axum() -> List[str]:
    path = Path(os.environ.get("STOREFRONT_BIN", REPO / "target" / "debug" / "storefront"))
    if not path.is_file():
        pytest.exit(f"storefront binary not found at {path}: build it or set STOREFRONT_BIN", 2)
    return [str(path)]


def flask() -> List[str]:
    return [sys.executable, str(REPO / "examples" / "storefront-flask" / "app.py")]


def django() -> List[str]:
    return [sys.executable, str(REPO / "examples" / "storefront-django" / "serve.py")]


def express() -> List[str]:
    return [os.environ.get("NODE", "node"), str(EXPRESS_SERVER)]


# Every adapter's storefront: its name and the command that starts it.
ADAPTERS: Dict[str, Callable[[], List[str]]] = {
    "axum": axum,
    "flask": flask,
    "django": django,
    "express": express,
}

