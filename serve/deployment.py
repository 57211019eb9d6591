"""The Ray Serve deployment of the HTTP API, and how to run it."""

from __future__ import annotations

import logging
from typing import Any

import ray
from fastapi import FastAPI
from ray import serve
from ray.exceptions import ActorDiedError, ActorUnavailableError, GetTimeoutError, RayTaskError

from actors import names
from novacron.access import Caller, Gate, redact_logs
from novacron.auth import AuthServices, OIDCConfig
from novacron.config import Settings
from novacron.errors import NovaCronError, Unavailable
from novacron.store import Store
from serve.api import build_app

log = logging.getLogger("novacron.serve")

APP_NAME = "novacron"


class RayBackend:
    """Reads the store file; calls the named controller actor."""

    def __init__(self, namespace: str, store_path: str, oidc: OIDCConfig | None = None) -> None:
        self.namespace = namespace
        self.store = Store(store_path, readonly=True)
        self._controller: Any = None
        self.gate = Gate(AuthServices.create(self.store, oidc=oidc).authenticator, self._audit)

    def _audit(self, **entry: Any) -> None:
        """Denials decided here are appended by the controller (the store's one writer)."""
        entry["result"] = entry["result"].value
        self._handle().audit_denial.remote(entry)

    def _handle(self) -> Any:
        if self._controller is None:
            try:
                self._controller = ray.get_actor(names.CONTROLLER, namespace=self.namespace)
            except ValueError as exc:
                raise Unavailable("the NovaCron controller is not running") from exc
        return self._controller

    async def call(self, method: str, caller: Caller, *args: Any, **kwargs: Any) -> Any:
        try:
            return await self._handle().call.remote(method, caller, *args, **kwargs)
        except RayTaskError as exc:
            if isinstance(exc.cause, NovaCronError):
                raise exc.cause from None
            raise
        except (ActorDiedError, ActorUnavailableError) as exc:
            self._controller = None
            raise Unavailable("the NovaCron controller is restarting; try again") from exc

    async def ready(self) -> bool:
        try:
            await self._handle().ping.remote()
        except (Unavailable, GetTimeoutError, ActorDiedError, ActorUnavailableError):
            self._controller = None
            return False
        return True


@serve.deployment(name="api", num_replicas=1, ray_actor_options={"num_cpus": 0},
                  max_ongoing_requests=200)
@serve.ingress()
class NovaCronAPI:
    """The API's Serve replica: builds the FastAPI app around its own backend."""

    def __init__(self, namespace: str, store_path: str, oidc: OIDCConfig | None) -> None:
        redact_logs()
        self.backend = RayBackend(namespace, store_path, oidc)

    def __serve_build_asgi_app__(self) -> FastAPI:
        app = build_app()
        app.state.backend = self.backend
        return app


def deploy(settings: Settings) -> None:
    """Serve the API on ``settings.api_host:api_port`` (Serve outlives the calling driver)."""
    serve.start(http_options={"host": settings.api_host, "port": settings.api_port})
    api: Any = NovaCronAPI
    serve.run(api.bind(settings.namespace, str(settings.store_path), settings.oidc),
              name=APP_NAME,
              route_prefix="/", blocking=False)
    log.info("API on http://%s:%d", settings.api_host, settings.api_port)


def undeploy() -> None:
    """Stop serving the API."""
    serve.delete(APP_NAME)
