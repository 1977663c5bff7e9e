"""pytest imports test files by basename (rootdir-relative packages are not used here):
two test files with one basename anywhere under tests/ stop the whole collection."""

from collections import Counter
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]


def test_test_file_basenames_are_unique():
    names = Counter(p.name for p in TESTS.rglob("test_*.py"))
    clashes = sorted(n for n, k in names.items() if k > 1)
    assert not clashes, f"test files sharing a basename (rename one): {clashes}"
