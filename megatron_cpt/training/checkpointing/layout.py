"""Process layouts (TP/PP/DP, DDP buckets) and which optimizer format loads at which one
(docs/training.md "Layout changes")."""
from __future__ import annotations

from dataclasses import dataclass


DP_RESHARDABLE, FULLY_RESHARDABLE = "dp_reshardable", "fully_reshardable"
MCORE_MIN_BUCKET = 40_000_000  # megatron-core DDP: bucket_size = max(40M, 1M x DP) with overlap


@dataclass(frozen=True)
class Layout:
    """A launch's process layout. Megatron's default rank order (``tp-cp-ep-dp-pp``, CP = EP = 1)
    puts TP fastest, then DP, then PP. ``bucket_size``: megatron-core's DDP bucket (None: one
    bucket), which a ``dp_reshardable`` optimizer checkpoint depends on."""

    tp: int = 1
    pp: int = 1
    dp: int = 1
    bucket_size: int | None = None

    @classmethod
    def of(cls, tp: int, pp: int, dp: int, overlap_grad_reduce: bool = False) -> "Layout":
        bucket = max(MCORE_MIN_BUCKET, 1_000_000 * dp) if overlap_grad_reduce else None
        return cls(tp, pp, dp, bucket)

    @classmethod
    def from_meta(cls, meta: dict) -> "Layout | None":
        """The writer's layout (None for checkpoints written before layouts were recorded)."""
        d = meta.get("layout")
        return None if not d else cls(d["tp"], d["pp"], d["dp"], d.get("bucket_size"))

    @property
    def world(self) -> int:
        return self.tp * self.pp * self.dp

    def rank(self, tp_rank: int, dp_rank: int, pp_rank: int) -> int:
        return tp_rank + self.tp * (dp_rank + self.dp * pp_rank)

    def describe(self) -> str:
        return f"TP{self.tp} PP{self.pp} DP{self.dp}"

    def to_dict(self) -> dict:
        return {"tp": self.tp, "pp": self.pp, "dp": self.dp, "world_size": self.world,
                "bucket_size": self.bucket_size}


def layout_problem(meta: dict, layout: Layout) -> str | None:
    """Why a checkpoint with ``meta`` cannot load at ``layout`` (None: it can). What cannot
    load: a ``dp_reshardable`` optimizer state at another TP/PP (its shards are DP slices of
    TP/PP-local buffers) or with another DDP bucket layout; a checkpoint older than the layout
    record at another world size (its layout is unknown)."""
    old, ranks = Layout.from_meta(meta), meta.get("world_size")
    if old is None:
        return None if ranks == layout.world else (
            f"was written by {ranks} ranks before layouts were recorded, this launch has "
            f"{layout.world}; resume it once with {ranks} processes and the same TP/PP")
    if meta.get("optimizer_format", DP_RESHARDABLE) == FULLY_RESHARDABLE:
        return None
    fix = (f"relaunch at TP{old.tp} PP{old.pp}, or resume there once with "
           f"checkpoint.optimizer_format={FULLY_RESHARDABLE} and save")
    if (old.tp, old.pp) != (layout.tp, layout.pp):
        return (f"was saved at {old.describe()} with checkpoint.optimizer_format={DP_RESHARDABLE}, "
                f"which resumes only at TP{old.tp} PP{old.pp} (any DP), not at "
                f"{layout.describe()}; {fix}")
    if old.bucket_size != layout.bucket_size:
        return (f"was saved with gradient buckets of {old.bucket_size} parameters, this launch "
                f"uses {layout.bucket_size} (megatron-core sizes them max(40M, 1M x DP) with "
                f"overlap_grad_reduce); {DP_RESHARDABLE} optimizer state needs the same buckets: "
                f"{fix}")
    return None
