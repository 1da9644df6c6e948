"""The per-model AdaSkip profile: offline IO similarities, scales and their joint ranking.

Stored as JSON next to the model's (converted) directory, so calibration runs once per model. The
default model's profile ships with strata (profiles/, named by the weights' fingerprint), so AdaSkip
works on it out of the box; a profile next to the model takes precedence.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from strata.engine.skip.skip_set import Kind

PROFILE_FILE = "adaskip-profile.json"
FORMAT_VERSION = 1


class ProfileMismatchError(ValueError):
    """The profile was calibrated on other weights than the model being served."""


SHIPPED = Path(__file__).resolve().parent / "profiles"


def profile_path(model_dir: Path) -> Path:
    return model_dir / PROFILE_FILE


def shipped_profile_path(fingerprint: str) -> Path:
    return SHIPPED / f"{fingerprint[:16]}.json"


@dataclass
class SkipProfile:
    model_name: str
    fingerprint: str
    num_layers: int
    sim_attn: list[float]
    sim_ffn: list[float]
    scale_attn: list[float]
    scale_ffn: list[float]
    corpus: str
    requests: int
    tokens_per_request: list[int]
    # How statistics were averaged over a request's tokens (see calibrate.py).
    averaging: str = "per-token mean, then mean over requests"
    ranking: list[tuple[int, Kind]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.ranking:
            self.ranking = rank_sublayers(self.sim_attn, self.sim_ffn)
        self.ranking = [(int(i), k) for i, k in self.ranking]

    def similarity(self, layer: int, kind: Kind) -> float:
        return (self.sim_attn if kind == "attn" else self.sim_ffn)[layer]

    def scale(self, layer: int, kind: Kind) -> float:
        return (self.scale_attn if kind == "attn" else self.scale_ffn)[layer]

    def eligible_ranking(self) -> list[tuple[int, Kind]]:
        """The joint ranking without layer 0 (never skipped: it turns embeddings into features)."""
        return [(i, k) for i, k in self.ranking if i != 0]

    def top(self, budget: int) -> list[tuple[int, Kind]]:
        return self.eligible_ranking()[: max(0, budget)]

    def beta(self, budget: int) -> float | None:
        """Lowest offline similarity inside the fixed set: the budget-th largest eligible similarity.

        None for budget 0 (nothing is skipped, so nothing is added online either)."""
        chosen = self.top(budget)
        return min(self.similarity(i, k) for i, k in chosen) if chosen else None

    def save(self, path: Path) -> None:
        data = {"format": FORMAT_VERSION, **asdict(self)}
        data["ranking"] = [{"layer": i, "sublayer": k, "similarity": self.similarity(i, k),
                            "scale": self.scale(i, k)} for i, k in self.ranking]
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=1))
        tmp.replace(path)  # never leave a half-written profile

    @classmethod
    def load(cls, path: Path, fingerprint: str | None = None) -> SkipProfile:
        """Read a profile; with `fingerprint`, refuse one calibrated on other weights."""
        data = json.loads(Path(path).read_text())
        if data.pop("format", None) != FORMAT_VERSION:
            raise ValueError(f"{path}: not an AdaSkip profile of format {FORMAT_VERSION}")
        data["ranking"] = [(r["layer"], r["sublayer"]) for r in data["ranking"]]
        profile = cls(**data)
        if fingerprint is not None and profile.fingerprint != fingerprint:
            raise ProfileMismatchError(
                f"{path} was calibrated for model {profile.model_name} ({profile.fingerprint[:12]}), "
                f"not for the loaded weights ({fingerprint[:12]}): run `strata calibrate` again"
            )
        return profile


def rank_sublayers(sim_attn: list[float], sim_ffn: list[float]) -> list[tuple[int, Kind]]:
    """All 2L sublayers jointly, most similar (least important) first; ties by position."""
    subs: list[tuple[int, Kind]] = [(i, "attn") for i in range(len(sim_attn))]
    subs += [(i, "ffn") for i in range(len(sim_ffn))]
    return sorted(subs, key=lambda s: (-(sim_attn if s[1] == "attn" else sim_ffn)[s[0]], s[0], s[1]))
