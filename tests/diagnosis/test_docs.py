import doctest
from pathlib import Path

DOC = Path(__file__).resolve().parents[2] / "docs" / "diagnosis.md"


def test_worked_example_in_the_docs_runs():
    result = doctest.testfile(str(DOC), module_relative=False, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0
