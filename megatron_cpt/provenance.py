"""Which code ran a launch: the suite version, and from a git checkout its commit and a hash
of uncommitted changes, so ``run.json`` tells whether a resume ran different code."""
from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

from megatron_cpt import __version__

ROOT = Path(__file__).resolve().parents[1]
CODE_DIRS = ("megatron_cpt", "data_prep", "eval", "configs")


def _git(*args: str) -> bytes | None:
    try:
        out = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout if out.returncode == 0 else None


def _uncommitted_hash() -> str | None:
    """sha256 of the tracked changes against HEAD plus the untracked code files (names and
    bytes); None for a clean checkout."""
    diff = _git("diff", "HEAD", "--binary") or b""
    untracked = (_git("ls-files", "--others", "--exclude-standard", "--", *CODE_DIRS) or b"")
    if not diff and not untracked.strip():
        return None
    h = hashlib.sha256(diff)
    for name in sorted(untracked.decode().split()):
        h.update(name.encode())
        f = ROOT / name
        h.update(f.read_bytes() if f.is_file() else b"")
    return h.hexdigest()[:16]


def provenance() -> dict:
    """``{version, git_commit, uncommitted}``; the git fields are None outside a checkout."""
    commit = _git("rev-parse", "HEAD") if (ROOT / ".git").exists() else None
    return {"version": __version__,
            "git_commit": commit.decode().strip() if commit else None,
            "uncommitted": _uncommitted_hash() if commit else None}


def differences(old: dict | None, new: dict) -> list[str]:
    """Fields of ``new`` that differ from an earlier launch's ``old`` provenance."""
    if not old:
        return []
    return [f"{k} {old.get(k)} -> {new.get(k)}" for k in new if old.get(k) != new.get(k)]
