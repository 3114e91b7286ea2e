"""docs/bad-inputs.md lists every refusal case of tests/reliability/test_bad_inputs.py by its id,
and every id in its first column is such a case (read as text: no subprocess, no fixture)."""
import os
import re

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _read(*path):
    with open(os.path.join(REPO, *path), encoding="utf-8") as f:
        return f.read()


def test_every_case_has_a_row_and_every_row_id_a_case():
    test = _read("tests", "reliability", "test_bad_inputs.py")
    cases = set()
    for table in ("PREPROCESS_CASES", "PRETRAIN_CASES"):
        body = re.search(rf"^{table} = \{{\n(.*?)^\}}", test, re.S | re.M).group(1)
        cases |= set(re.findall(r'^    "([a-z0-9-]+)":', body, re.M))
    assert len(cases) > 20
    rows = set(re.findall(r"^\| ([a-z0-9]+(?:-[a-z0-9]+)+) \|", _read("docs", "bad-inputs.md"), re.M))
    assert cases - rows == set(), "cases without a row in docs/bad-inputs.md"
    assert rows - cases == set(), "rows whose id is no case of test_bad_inputs.py"
