"""Where quantkit keeps what it makes on disk (no heavy imports: the kernel loader reads this too)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """``$QUANTKIT_CACHE_DIR`` (an empty value counts as unset), else ``~/.cache/quantkit``: converted
    models, token sets, built kernels, stored scores and kept perplexity windows."""
    return Path(os.environ.get("QUANTKIT_CACHE_DIR") or Path.home() / ".cache" / "quantkit")
