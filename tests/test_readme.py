"""README.md's library example, run verbatim (with a value model saved at the path it names), so the
documentation cannot rot."""

import re
from pathlib import Path

import pytest
from helpers import random_value_model

from vas.config import EMBEDDED_MODEL
from vas.models import embedded_model_dir

README = Path(__file__).resolve().parents[1] / "README.md"


def library_example() -> str:
    match = re.search(r"<!-- library-example -->\n```python\n(.*?)```", README.read_text(), re.S)
    assert match, "README.md has no library example after <!-- library-example -->"
    return match.group(1)


@pytest.mark.slow
def test_readme_library_example_runs_verbatim(tmp_path, monkeypatch, capsys):
    code = library_example()
    assert '"runs/value"' in code and EMBEDDED_MODEL in code
    random_value_model(str(embedded_model_dir()), num_layers=1).save_pretrained(tmp_path / "runs" / "value")
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {})
    printed = capsys.readouterr().out.strip()
    text, kl = printed.rsplit(" ", 1)
    assert text and float(kl) > 0  # a response, steered away from π0 by the (random) value model
