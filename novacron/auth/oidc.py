"""OIDC / OAuth2 bearer JWTs: signature checked against the provider's JWKS, then issuer,
audience, expiry and not-before; claims mapped to a tenant and roles by configuration.

Only asymmetric algorithms are accepted (RS256 and ES256 by default): never ``none`` and never an
HMAC algorithm, which would let anyone holding the public key sign. A token must name its key
(``kid``); the key's type, curve and declared ``alg`` must fit the token's algorithm.

The JWKS is fetched with httpx and cached for ``jwks_ttl``. An unknown ``kid`` (the provider
rotated its keys) triggers a refetch, but fetches happen at most once per ``jwks_min_refetch``
seconds, so forged kids or a down provider cannot make NovaCron hammer it; a failed refetch keeps
the keys already known.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import threading
import time
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

import httpx
import jwt
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from novacron.auth.principals import ALL_TENANTS, TENANT_NAME, Grant, Principal, PrincipalKind
from novacron.auth.records import Clock
from novacron.auth.roles import ADMIN, RoleStore
from novacron.errors import InvalidRequest, NotFound, Unauthenticated, Unavailable

log = logging.getLogger("novacron.auth")

ASYMMETRIC_ALGORITHMS = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512",
                                   "ES256", "ES384", "ES512"})
_EC_CURVES = {"ES256": "P-256", "ES384": "P-384", "ES512": "P-521"}
MAX_TOKEN_BYTES = 16 * 1024
MAX_JWKS_BYTES = 1024 * 1024


class OIDCConfig(BaseModel):
    """One identity provider and how its claims map to NovaCron tenants and roles.

    ``role_mapping`` maps a value of the roles claim to a NovaCron role in the token's tenant
    (the ``tenant_claim``, else ``default_tenant``); ``global_role_mapping`` maps one to a role in
    every tenant (``*``; the only way to map to ``admin``). Claim names may be dotted paths
    (``realm_access.roles``). Unmapped values grant nothing.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    issuer: str = Field(min_length=1)
    audience: str = Field(min_length=1)
    jwks_url: str
    algorithms: tuple[str, ...] = ("RS256", "ES256")
    leeway: float = Field(default=30.0, ge=0, le=300)
    subject_claim: str = "sub"
    tenant_claim: str = "tenant"
    default_tenant: str | None = None
    roles_claim: str = "roles"
    role_mapping: dict[str, str] = Field(default_factory=dict)
    global_role_mapping: dict[str, str] = Field(default_factory=dict)
    jwks_ttl: float = Field(default=300.0, gt=0)
    jwks_min_refetch: float = Field(default=30.0, ge=0)
    http_timeout: float = Field(default=5.0, gt=0, le=60)

    @field_validator("algorithms")
    @classmethod
    def _asymmetric_only(cls, algs: tuple[str, ...]) -> tuple[str, ...]:
        bad = [a for a in algs if a not in ASYMMETRIC_ALGORITHMS]
        if bad or not algs:
            raise ValueError(f"allowed algorithms are {sorted(ASYMMETRIC_ALGORITHMS)}, "
                             f"not {bad or 'none'}")
        return algs

    @field_validator("jwks_url")
    @classmethod
    def _https_unless_loopback(cls, url: str) -> str:
        parts = urlsplit(url)
        host = parts.hostname or ""
        if parts.scheme == "https" and host:
            return url
        if parts.scheme == "http" and (host == "localhost" or _is_loopback(host)):
            return url
        raise ValueError("jwks_url must be https (plain http only on a loopback address)")

    @model_validator(mode="after")
    def _admin_only_globally(self) -> OIDCConfig:
        if ADMIN in self.role_mapping.values():
            raise ValueError("admin covers every tenant: map it in global_role_mapping")
        if self.default_tenant is not None and not TENANT_NAME.fullmatch(self.default_tenant):
            raise ValueError(f"default_tenant is not a tenant name: {self.default_tenant!r}")
        return self


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class JWKSCache:
    """The provider's signing keys by ``kid``, fetched lazily, refreshed on TTL or unknown kid."""

    def __init__(self, url: str, *, ttl: float = 300.0, min_refetch: float = 30.0,
                 timeout: float = 5.0, clock: Clock = time.monotonic) -> None:
        self._url = url
        self._ttl = ttl
        self._min_refetch = min_refetch
        self._timeout = timeout
        self._clock = clock
        self._lock = threading.Lock()
        self._jwks: dict[str, dict[str, Any]] | None = None
        self._built: dict[tuple[str, str], jwt.PyJWK] = {}
        self._fetched_at = 0.0
        self._attempted_at: float | None = None

    def key(self, kid: str, alg: str) -> jwt.PyJWK:
        """The key ``kid`` for ``alg``; Unauthenticated if unknown or unfit, Unavailable if the
        provider's keys were never obtained."""
        with self._lock:
            now = self._clock()
            stale = (self._jwks is None or kid not in self._jwks
                     or now - self._fetched_at >= self._ttl)
            if stale and (self._attempted_at is None
                          or now - self._attempted_at >= self._min_refetch):
                self._refresh(now)
            if self._jwks is None:
                raise Unavailable("the identity provider's signing keys cannot be fetched")
            jwk = self._jwks.get(kid)
            if jwk is None:
                raise Unauthenticated("token signed with an unknown key")
            built = self._built.get((kid, alg))
            if built is None:
                built = self._built[(kid, alg)] = _build_key(jwk, alg)
            return built

    def _refresh(self, now: float) -> None:
        self._attempted_at = now
        try:
            jwks = _parse_jwks(self._fetch())
        except (httpx.HTTPError, ValueError) as exc:
            log.warning("cannot fetch JWKS from %s: %s", self._url, exc)
            return
        self._jwks, self._built, self._fetched_at = jwks, {}, now
        log.info("fetched %d signing keys from %s", len(jwks), self._url)

    def _fetch(self) -> Any:
        with httpx.stream("GET", self._url, timeout=self._timeout,
                          follow_redirects=False) as resp:
            if resp.status_code != 200:
                raise ValueError(f"HTTP {resp.status_code}")
            body = b""
            for chunk in resp.iter_bytes():
                body += chunk
                if len(body) > MAX_JWKS_BYTES:
                    raise ValueError("JWKS document too large")
        return json.loads(body)


def _parse_jwks(doc: Any) -> dict[str, dict[str, Any]]:
    """Usable signature keys of a JWKS document by kid (symmetric and foreign keys dropped)."""
    if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
        raise ValueError("not a JWKS document")
    keys: dict[str, dict[str, Any]] = {}
    for jwk in doc["keys"]:
        if (isinstance(jwk, dict) and isinstance(jwk.get("kid"), str)
                and jwk.get("kty") in ("RSA", "EC") and jwk.get("use", "sig") == "sig"):
            keys[jwk["kid"]] = jwk
    return keys


def _build_key(jwk: dict[str, Any], alg: str) -> jwt.PyJWK:
    declared = jwk.get("alg")
    family_ok = (jwk["kty"] == "RSA" and alg[:2] in ("RS", "PS")) or (
        jwk["kty"] == "EC" and _EC_CURVES.get(alg) == jwk.get("crv"))
    if not family_ok or (declared is not None and declared != alg):
        raise Unauthenticated("token algorithm does not fit its key")
    try:
        return jwt.PyJWK(jwk, algorithm=alg)
    except (jwt.PyJWTError, ValueError, TypeError):
        raise Unauthenticated("token signed with an unusable key") from None


_DECODE_ERRORS: tuple[tuple[type[jwt.PyJWTError], str], ...] = (
    (jwt.ExpiredSignatureError, "token expired"),
    (jwt.ImmatureSignatureError, "token not yet valid"),
    (jwt.InvalidAudienceError, "token audience mismatch"),
    (jwt.InvalidIssuerError, "token issuer mismatch"),
    (jwt.InvalidSignatureError, "token signature invalid"),
    (jwt.MissingRequiredClaimError, "token lacks a required claim"),
)


class OIDCVerifier:
    """Verifies bearer JWTs of one provider and maps them to principals."""

    def __init__(self, config: OIDCConfig, roles: RoleStore,
                 jwks: JWKSCache | None = None) -> None:
        self.config = config
        self._roles = roles
        self._jwks = jwks or JWKSCache(config.jwks_url, ttl=config.jwks_ttl,
                                       min_refetch=config.jwks_min_refetch,
                                       timeout=config.http_timeout)

    def claims(self, token: str) -> dict[str, Any]:
        """The verified claims of ``token``; Unauthenticated (a fixed message) if anything fails."""
        cfg = self.config
        if len(token) > MAX_TOKEN_BYTES:
            raise Unauthenticated("malformed bearer token")
        try:
            header = jwt.get_unverified_header(token)
        except (jwt.PyJWTError, ValueError, TypeError):
            raise Unauthenticated("malformed bearer token") from None
        alg, kid = header.get("alg"), header.get("kid")
        if not isinstance(alg, str) or alg not in cfg.algorithms:
            raise Unauthenticated("token algorithm not allowed")
        if not isinstance(kid, str) or not kid:
            raise Unauthenticated("token names no signing key")
        key = self._jwks.key(kid, alg)
        try:
            claims: dict[str, Any] = jwt.decode(
                token, key, algorithms=[alg], audience=cfg.audience, issuer=cfg.issuer,
                leeway=cfg.leeway, options={"require": ["exp", "iss", "aud"]})
        except jwt.PyJWTError as exc:
            message = next((m for t, m in _DECODE_ERRORS if isinstance(exc, t)),
                           "invalid bearer token")
            raise Unauthenticated(message) from None
        except (ValueError, TypeError):
            raise Unauthenticated("invalid bearer token") from None
        return claims

    def authenticate(self, token: str) -> Principal:
        """The principal of a valid token: mapped grants plus any stored role bindings."""
        cfg = self.config
        claims = self.claims(token)
        subject = _lookup(claims, cfg.subject_claim)
        if not isinstance(subject, str) or not subject:
            raise Unauthenticated(f"token lacks the {cfg.subject_claim} claim")
        tenant = _lookup(claims, cfg.tenant_claim)
        if tenant is None:
            tenant = cfg.default_tenant
        if tenant is not None and not (isinstance(tenant, str) and TENANT_NAME.fullmatch(tenant)):
            log.warning("ignoring an invalid tenant claim in a token for %s", subject)
            tenant = None
        principal_id = f"oidc:{cfg.issuer}#{subject}"
        grants: list[Grant] = []
        for value in _strings(_lookup(claims, cfg.roles_claim)):
            for role, where in ((cfg.global_role_mapping.get(value), ALL_TENANTS),
                                (cfg.role_mapping.get(value), tenant)):
                if role is not None and where is not None:
                    try:
                        grants.append(self._roles.grant(role, where))
                    except (NotFound, InvalidRequest):
                        log.warning("OIDC role mapping names unusable role %s", role)
        grants.extend(self._roles.grants_for(principal_id))
        jti = claims.get("jti")
        return Principal(principal_id, PrincipalKind.OIDC, tenant, tuple(grants),
                         credential_id=jti if isinstance(jti, str) else None)


def _lookup(claims: Mapping[str, Any], path: str) -> Any:
    value: Any = claims
    for part in path.split("."):
        if not isinstance(value, Mapping):
            return None
        value = value.get(part)
    return value


def _strings(value: Any) -> list[str]:
    """A roles claim as a list: a JSON list of strings, or one space-separated string."""
    if isinstance(value, str):
        return value.split()
    if isinstance(value, list):
        return [v for v in value if isinstance(v, str)]
    return []
