"""A plain clone is complete: every fixture the tests, benchmarks and README examples read lives
in the repository (``reference/``, with its licence), never in a ``../shared`` beside it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "registry_tests"))


def _inside(path: Path) -> bool:
    return path.resolve().is_relative_to(ROOT)


def test_fixture_folders_are_in_the_repo_with_their_licences():
    import registry_helpers
    import support
    import test_infra

    for folder in (support.OFFICIAL_PLANS, registry_helpers.OFFICIAL, test_infra.CRDS):
        assert _inside(folder), f"{folder} is outside the repository"
        assert folder.is_dir(), folder
    assert len(list(support.OFFICIAL_PLANS.glob("dit_*.json"))) == 2
    assert len(list(support.OFFICIAL_PLANS.glob("flux_*.json"))) == 4
    assert (support.OFFICIAL_PLANS / "LICENSE.txt").is_file()
    assert {p.name for p in test_infra.CRDS.iterdir()} >= {
        "LICENSE", "ray.io_rayclusters.yaml.gz", "ray.io_rayjobs.yaml.gz", "ray.io_raycronjobs.yaml.gz"
    }


def test_no_tracked_file_reads_the_shared_folder_beside_the_clone():
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    offenders = []
    for name in files:
        path = ROOT / name
        if path.suffix not in {".py", ".md", ".sh", ".yaml", ".toml", ""} or name.startswith("tests/test_repo_fixtures"):
            continue
        try:
            text = path.read_text()
        except (UnicodeDecodeError, IsADirectoryError):
            continue
        if "../shared" in text or '"shared" / "reference"' in text:
            offenders.append(name)
    assert not offenders, f"these files read ../shared, which a user's clone lacks: {offenders}"
