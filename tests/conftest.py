import textwrap
from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures"
SEED_CONFIG = FIXTURES / "seed" / "sidecar-config.yaml"


@pytest.fixture
def write(tmp_path):
    """Write a dedented text file under tmp_path and return its path."""

    def write(name: str, text: str) -> Path:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text).lstrip("\n"))
        return path

    return write
