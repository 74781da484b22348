"""The configuration example in the README is a configuration the gateway accepts."""

from __future__ import annotations

import re
from pathlib import Path

from wardgate.config import load

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_config_example_loads(tmp_path) -> None:
    block = re.findall(r"```toml\n(.*?)```", README.read_text(), re.S)[0]
    (tmp_path / "wardgate.toml").write_text(block)
    (tmp_path / "policy.toml").write_text("")  # the example includes one
    settings = load(tmp_path / "wardgate.toml", env={"WARDGATE_CONN_SHOP_DB_PASSWORD": "x"})
    review = next(r for r in settings.guardrails if r.action == "review")
    assert review.approvers == ("dba",) and settings.reviews.ttl_seconds == 24 * 3600
    assert settings.exec.wait_seconds == 50 and settings.masking and settings.access
