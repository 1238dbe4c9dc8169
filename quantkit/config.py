"""Pipeline configs: plain dataclasses, each holding the one shared Scheme. The CLI fills them."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from quantkit.scheme import Scheme


@dataclass(frozen=True)
class PTQConfig:
    """Vanilla post-training quantization: round-to-nearest with the scheme, no data needed."""

    output: Path
    model: str | None = None  # None = the embedded default (SmolLM2-135M-Instruct)
    scheme: Scheme = field(default_factory=Scheme)
    overwrite: bool = False

    def to_dict(self) -> dict:
        d = asdict(self)
        d["output"], d["scheme"] = str(self.output), self.scheme.to_dict()
        return d
