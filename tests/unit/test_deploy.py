"""The deployment files (Dockerfile, deploy/docker-compose.yml, the Helm chart) hold together: they
parse, the chart's templates only name values that values.yaml defines, the configs they ship load
as gateway settings, and every replica gets the shared secrets and a data volume of its own. (Neither
Docker nor Helm runs here; the same topology runs as processes in tests/integration/test_replicas.py.)"""

from __future__ import annotations

import re
from pathlib import Path

import yaml
from typer.testing import CliRunner

from wardgate.cli import app
from wardgate.config import load

ROOT = Path(__file__).parents[2]
CHART = ROOT / "deploy" / "helm" / "wardgate"


def test_compose_runs_two_replicas_on_one_store() -> None:
    compose = yaml.safe_load((ROOT / "deploy" / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"store", "target", "gateway-a", "gateway-b"} <= set(services)
    a, b = services["gateway-a"], services["gateway-b"]
    for gw in (a, b):
        env = gw["environment"]
        assert env["WARDGATE_STORE_URL"].startswith("postgresql://") and "@store:5432/" in env["WARDGATE_STORE_URL"]
        assert "WARDGATE_SECRET_KEY" in env and "readyz" in " ".join(gw["healthcheck"]["test"])
    data = [next(v for v in gw["volumes"] if v.endswith(":/data")) for gw in (a, b)]
    assert data[0] != data[1]  # each replica's journal on a volume of its own
    assert set(compose["volumes"]) >= {d.split(":")[0] for d in data}
    assert (ROOT / "deploy" / ".env.example").exists()


def test_the_shipped_configs_load(tmp_path) -> None:
    env = {"WARDGATE_DATA_DIR": str(tmp_path), "WARDGATE_CONN_SHOP_PASSWORD": "x"}
    settings = load(ROOT / "deploy" / "wardgate.toml", env=env)
    assert settings.gateway.log_format == "json" and settings.connections[0].name == "shop"
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    chart_config = tmp_path / "chart.toml"
    chart_config.write_text(values["config"])
    assert load(chart_config, env=env).gateway.metrics_token_env == "WARDGATE_METRICS_TOKEN"


def _paths(tree: dict, prefix: str = "") -> set[str]:
    out = set()
    for key, value in tree.items():
        out.add(prefix + key)
        if isinstance(value, dict):
            out |= _paths(value, prefix + key + ".")
    return out


def test_the_chart_names_only_values_it_defines() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["apiVersion"] == "v2" and chart["name"] == "wardgate"
    defined = _paths(yaml.safe_load((CHART / "values.yaml").read_text()))
    templates = list((CHART / "templates").glob("*"))
    used = {m for t in templates for m in re.findall(r"\.Values\.([A-Za-z0-9_.]+)", t.read_text())}
    assert used and not used - defined, f"templates name values that values.yaml lacks: {sorted(used - defined)}"
    kinds = {m for t in templates for m in re.findall(r"^kind: (\w+)", t.read_text(), re.M)}
    assert {"StatefulSet", "Service", "Secret", "ConfigMap", "Ingress"} <= kinds
    sts = (CHART / "templates" / "statefulset.yaml").read_text()
    assert "/livez" in sts and "/readyz" in sts and "volumeClaimTemplates" in sts and "runAsNonRoot: true" in sts


def test_the_image_runs_the_gateway_as_documented() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "USER wardgate" in dockerfile and "/livez" in dockerfile
    cmd = re.search(r'^CMD (\[.*\])$', dockerfile, re.M)
    assert cmd and yaml.safe_load(cmd.group(1))[:1] == ["serve"]
    help_text = CliRunner().invoke(app, ["serve", "--help"], env={"COLUMNS": "200"}).output
    for flag in yaml.safe_load(cmd.group(1)):
        if flag.startswith("--"):
            assert flag in help_text, f"the image runs `wardgate serve {flag}`, which serve does not take"
