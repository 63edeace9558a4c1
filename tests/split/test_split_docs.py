import doctest
from pathlib import Path

DOC = Path(__file__).resolve().parents[2] / "docs" / "split.md"


def test_the_split_guide_runs():
    result = doctest.testfile(
        str(DOC), module_relative=False, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False
    )
    assert result.attempted > 20 and result.failed == 0
