"""Docker cannot run here: the compose file is checked against the settings it configures (test_wheel.py installs
the wheel the Dockerfile installs, and serves from it)."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from imgsearch.config import Settings

ROOT = Path(__file__).resolve().parent.parent


def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_every_imgsearch_variable_is_a_setting():
    fields = {f"IMGSEARCH_{name.upper()}" for name in Settings.model_fields}
    used = set()
    for service in compose()["services"].values():
        used |= {name for name in (service.get("environment") or {}) if name.startswith("IMGSEARCH_")}
    dockerfile_env = re.findall(r"(IMGSEARCH_[A-Z_]+)=", (ROOT / "Dockerfile").read_text())
    used |= set(dockerfile_env)
    assert used and used <= fields, used - fields
    assert "IMGSEARCH_MILVUS_URI" in used


def test_the_service_waits_for_milvus_and_has_health_checks():
    services = compose()["services"]
    assert {"etcd", "minio", "milvus", "imgsearch"} <= set(services)
    api = services["imgsearch"]
    assert api["environment"]["IMGSEARCH_MILVUS_URI"] == "http://milvus:19530"
    assert api["depends_on"]["milvus"]["condition"] == "service_healthy"
    assert "/health" in " ".join(api["healthcheck"]["test"]) and "8000:8000" in api["ports"]
    assert api["command"][:2] == ["imgsearch", "serve"]
    for name in ("etcd", "minio", "milvus"):
        assert services[name]["healthcheck"]["test"]
    declared = set(compose()["volumes"])
    for service in services.values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            assert source.startswith(".") or source in declared, volume

