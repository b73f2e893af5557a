"""The atheris (libFuzzer) targets of ``fuzz/atheris_targets.py`` run clean for a few
thousand inputs each: any exception other than the documented one for bad input, or a
broken invariant, is a crash and a non-zero exit.  ``make fuzz`` runs them longer."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
HARNESS = ROOT / "fuzz" / "atheris_targets.py"
RUNS = 5000


@pytest.mark.parametrize("target", ["framer", "decoders", "proxy_protocol"])
def test_target_runs_clean(target: str, tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            str(HARNESS),
            target,
            f"-runs={RUNS}",
            "-seed=1",
            f"-artifact_prefix={tmp_path}/",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"Done {RUNS} runs" in result.stderr
    assert not list(tmp_path.glob("crash-*"))


def test_an_unknown_target_is_refused() -> None:
    """The harness refuses an unknown target (so a typo cannot pass silently)."""
    result = subprocess.run(
        [sys.executable, str(HARNESS), "no-such-target"], capture_output=True, text=True
    )
    assert result.returncode != 0
    assert "usage:" in result.stderr
