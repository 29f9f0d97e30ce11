"""Fixtures shared by several test files."""
from __future__ import annotations

import pytest


@pytest.fixture
def wandb_env(monkeypatch, tmp_path):
    """No key, no server, nothing written outside tmp_path, whatever the caller's environment."""
    for key in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_BASE_URL", "WANDB_IDENTITY_TOKEN_FILE",
                "WANDB_RUN_ID", "WANDB_SWEEP_ID", "HTTPS_PROXY", "https_proxy", "HTTP_PROXY",
                "http_proxy"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    for key in ("WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(key, str(tmp_path / "wandb-home" / key.lower()))
