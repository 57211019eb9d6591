"""Settings, from ``NOVACRON_*`` environment variables (pydantic-settings) or arguments."""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from novacron.auth.oidc import OIDCConfig


def default_state_dir() -> Path:
    """``$NOVACRON_STATE_DIR`` or ``~/.novacron``."""
    return Path.home() / ".novacron"


class Settings(BaseSettings):
    """Everything the control plane can be tuned with; each field is ``NOVACRON_<NAME>``."""

    model_config = SettingsConfigDict(env_prefix="NOVACRON_", extra="forbid")

    state_dir: Path = Field(default_factory=default_state_dir)
    namespace: str = "novacron"
    api_host: str = "127.0.0.1"
    api_port: int = Field(default=8000, ge=1, le=65535)
    dashboard_port: int = Field(default=8265, ge=1, le=65535)
    ray_port: int = Field(default=6379, ge=1, le=65535)
    sim_hosts: int = Field(default=4, ge=0, le=1000)
    heartbeat_interval_s: float = Field(default=1.0, gt=0, le=60)
    heartbeat_misses: int = Field(default=5, ge=1, le=100)
    reconcile_interval_s: float = Field(default=1.0, gt=0, le=60)
    converge_timeout_s: float = Field(default=60.0, gt=0)
    stop_timeout_s: float = Field(default=30.0, gt=0, le=3600)
    oidc: OIDCConfig | None = None  # NOVACRON_OIDC='{"issuer": ..., "audience": ..., ...}'
    # The rebalancer (novacron.rebalancing): off by default; `novacron rebalance` proposes anyway.
    rebalance_enabled: bool = False  # run it every rebalance_interval_s and start its migrations
    rebalance_interval_s: float = Field(default=300.0, ge=1, le=86400)
    rebalance_threshold: float = Field(default=0.85, gt=0, le=1)  # a host above this share is hot
    rebalance_tolerance: float = Field(default=0.15, ge=0, le=1)  # tolerated share above the mean
    rebalance_max_moves: int = Field(default=4, ge=1, le=100)  # migrations per round at most
    rebalance_min_gain: float = Field(default=0.001, ge=0, le=1)  # least improvement per move

    @property
    def store_path(self) -> Path:
        return self.state_dir / "state.db"


ADMIN_TOKEN_FILE = "admin.token"


def write_secret(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` readable by its owner only (mode 0600 from the start)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text + "\n")
    tmp.replace(path)


def find_token(state_dir: Path | None = None) -> str | None:
    """The API token to use: ``$NOVACRON_TOKEN``, else ``<state dir>/admin.token``."""
    token = os.environ.get("NOVACRON_TOKEN", "").strip()
    if token:
        return token
    path = (state_dir or Path(os.environ.get("NOVACRON_STATE_DIR", "") or default_state_dir()))
    try:
        return (path / ADMIN_TOKEN_FILE).read_text().strip() or None
    except OSError:
        return None
