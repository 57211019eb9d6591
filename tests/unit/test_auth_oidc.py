"""OIDC bearer JWTs against a JWKS server on 127.0.0.1 with keys generated here."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jwt.algorithms import ECAlgorithm, RSAAlgorithm
from pydantic import ValidationError

from novacron.auth.oidc import JWKSCache, OIDCConfig, OIDCVerifier
from novacron.auth.principals import ALL_TENANTS, PrincipalKind
from novacron.auth.records import MemoryRecords
from novacron.auth.roles import ADMIN, OPERATOR, VIEWER, RoleStore
from novacron.errors import Unauthenticated, Unavailable

ISSUER = "https://idp.example.test/realms/novacron"
AUDIENCE = "novacron-api"

RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
RSA_KEY_2 = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_KEY = ec.generate_private_key(ec.SECP256R1())
HMAC_SECRET = b"0123456789abcdef0123456789abcdef"


def rsa_jwk(key: rsa.RSAPrivateKey, kid: str) -> dict[str, Any]:
    return {**RSAAlgorithm.to_jwk(key.public_key(), as_dict=True), "kid": kid, "use": "sig",
            "alg": "RS256"}


def ec_jwk(key: ec.EllipticCurvePrivateKey, kid: str) -> dict[str, Any]:
    return {**ECAlgorithm.to_jwk(key.public_key(), as_dict=True), "kid": kid, "use": "sig"}


class JWKSServer:
    """A JWKS endpoint on an ephemeral 127.0.0.1 port, counting its hits."""

    def __init__(self) -> None:
        self.document: dict[str, Any] = {"keys": []}
        self.status = 200
        self.hits = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server.hits += 1
                body = json.dumps(server.document).encode()
                self.send_response(server.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/jwks"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,),
                                       daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


@pytest.fixture(scope="module")
def server() -> Iterator[JWKSServer]:
    srv = JWKSServer()
    yield srv
    srv.close()


@pytest.fixture(autouse=True)
def reset_server(server: JWKSServer) -> None:
    server.document = {"keys": [rsa_jwk(RSA_KEY, "rsa-1"), ec_jwk(EC_KEY, "ec-1")]}
    server.status = 200
    server.hits = 0


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make(server: JWKSServer, clock: FakeClock | None = None, *,
         roles: RoleStore | None = None, **overrides: Any) -> OIDCVerifier:
    config = OIDCConfig(**{
        "issuer": ISSUER, "audience": AUDIENCE, "jwks_url": server.url,
        "role_mapping": {"nc-operator": OPERATOR, "nc-viewer": VIEWER},
        "global_role_mapping": {"nc-admin": ADMIN}, **overrides})
    jwks = JWKSCache(config.jwks_url, ttl=config.jwks_ttl, min_refetch=config.jwks_min_refetch,
                     timeout=2.0, clock=clock or FakeClock())
    return OIDCVerifier(config, roles or RoleStore(MemoryRecords()), jwks)


def claims(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    return {"iss": ISSUER, "aud": AUDIENCE, "sub": "alice", "iat": now, "exp": now + 300,
            "tenant": "acme", "roles": ["nc-operator", "unrelated"], **overrides}


def sign(payload: dict[str, Any], key: Any = RSA_KEY, kid: str | None = "rsa-1",
         alg: str = "RS256") -> str:
    headers = {"kid": kid} if kid is not None else {}
    return jwt.encode(payload, key, algorithm=alg, headers=headers)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def handmade(header: dict[str, Any], payload: dict[str, Any], signature: bytes = b"") -> str:
    return ".".join([b64(json.dumps(header).encode()), b64(json.dumps(payload).encode()),
                     b64(signature)])


# --- the acceptance cases ---------------------------------------------------------------------

def test_valid_rs256_token(server: JWKSServer) -> None:
    verifier = make(server)
    who = verifier.authenticate(sign(claims(jti="j-1")))
    assert who.id == f"oidc:{ISSUER}#alice"
    assert who.kind == PrincipalKind.OIDC
    assert who.tenant == "acme"
    assert who.credential_id == "j-1"
    assert [(g.tenant, g.role) for g in who.grants] == [("acme", OPERATOR)]
    assert server.hits == 1
    verifier.authenticate(sign(claims()))
    assert server.hits == 1  # cached


def test_valid_es256_token(server: JWKSServer) -> None:
    who = make(server).authenticate(sign(claims(), EC_KEY, "ec-1", "ES256"))
    assert who.tenant == "acme"


def test_expired_token(server: JWKSServer) -> None:
    old = int(time.time()) - 3600
    with pytest.raises(Unauthenticated, match="token expired"):
        make(server).authenticate(sign(claims(iat=old - 300, exp=old)))


def test_expiry_leeway(server: JWKSServer) -> None:
    just = int(time.time()) - 10
    make(server).authenticate(sign(claims(exp=just)))  # within the 30 s leeway
    with pytest.raises(Unauthenticated, match="expired"):
        make(server, leeway=0).authenticate(sign(claims(exp=just)))


def test_not_yet_valid_token(server: JWKSServer) -> None:
    with pytest.raises(Unauthenticated, match="not yet valid"):
        make(server).authenticate(sign(claims(nbf=int(time.time()) + 3600)))


def test_wrong_audience(server: JWKSServer) -> None:
    with pytest.raises(Unauthenticated, match="audience"):
        make(server).authenticate(sign(claims(aud="another-api")))
    make(server).authenticate(sign(claims(aud=["another-api", AUDIENCE])))


def test_wrong_issuer(server: JWKSServer) -> None:
    with pytest.raises(Unauthenticated, match="issuer"):
        make(server).authenticate(sign(claims(iss="https://evil.example.test")))


@pytest.mark.parametrize("missing", ["exp", "iss", "aud"])
def test_required_claims(server: JWKSServer, missing: str) -> None:
    payload = claims()
    del payload[missing]
    with pytest.raises(Unauthenticated):
        make(server).authenticate(sign(payload))


def test_missing_subject(server: JWKSServer) -> None:
    payload = claims()
    del payload["sub"]
    with pytest.raises(Unauthenticated, match="sub"):
        make(server).authenticate(sign(payload))


def test_unknown_kid_is_refused_after_one_refetch(server: JWKSServer) -> None:
    verifier = make(server, jwks_min_refetch=0)
    verifier.authenticate(sign(claims()))
    with pytest.raises(Unauthenticated, match="unknown key"):
        verifier.authenticate(sign(claims(), RSA_KEY_2, "nobody-knows"))
    assert server.hits == 2


def test_unknown_kids_do_not_hammer_the_provider(server: JWKSServer) -> None:
    clock = FakeClock()
    verifier = make(server, clock, jwks_min_refetch=30)
    verifier.authenticate(sign(claims()))
    for i in range(20):
        with pytest.raises(Unauthenticated):
            verifier.authenticate(sign(claims(), RSA_KEY_2, f"forged-{i}"))
    assert server.hits == 1  # within min_refetch of the first fetch: no refetch at all
    clock.now += 30
    for i in range(20):
        with pytest.raises(Unauthenticated):
            verifier.authenticate(sign(claims(), RSA_KEY_2, f"forged-{i}"))
    assert server.hits == 2


def test_rotated_key_is_picked_up(server: JWKSServer) -> None:
    clock = FakeClock()
    verifier = make(server, clock)
    verifier.authenticate(sign(claims()))
    server.document = {"keys": [rsa_jwk(RSA_KEY_2, "rsa-2")]}  # the provider rotates
    clock.now += 31
    who = verifier.authenticate(sign(claims(), RSA_KEY_2, "rsa-2"))
    assert who.tenant == "acme"
    assert server.hits == 2
    # The retired key is gone once the refreshed set is in use.
    clock.now += 301
    with pytest.raises(Unauthenticated):
        verifier.authenticate(sign(claims(), RSA_KEY, "rsa-1"))


def test_jwks_refreshed_after_ttl(server: JWKSServer) -> None:
    clock = FakeClock()
    verifier = make(server, clock, jwks_ttl=60)
    verifier.authenticate(sign(claims()))
    clock.now += 61
    verifier.authenticate(sign(claims()))
    assert server.hits == 2


def test_alg_none_is_refused(server: JWKSServer) -> None:
    for alg in ("none", "None", "NONE"):
        token = handmade({"alg": alg, "typ": "JWT", "kid": "rsa-1"}, claims())
        with pytest.raises(Unauthenticated, match="algorithm not allowed"):
            make(server).authenticate(token)
    assert server.hits == 0  # refused before any key lookup


def test_hs256_with_the_public_key_as_secret_is_refused(server: JWKSServer) -> None:
    pem = RSA_KEY.public_key().public_bytes(serialization.Encoding.PEM,
                                            serialization.PublicFormat.SubjectPublicKeyInfo)
    header = {"alg": "HS256", "typ": "JWT", "kid": "rsa-1"}
    unsigned = handmade(header, claims()).rsplit(".", 1)[0]
    mac = hmac.new(pem, unsigned.encode(), hashlib.sha256).digest()
    with pytest.raises(Unauthenticated, match="algorithm not allowed"):
        make(server).authenticate(f"{unsigned}.{b64(mac)}")
    # Even if an operator listed it, the config refuses symmetric algorithms.
    with pytest.raises(ValidationError):
        make(server, algorithms=("RS256", "HS256"))


def test_algorithm_must_fit_the_key(server: JWKSServer) -> None:
    # An EC key id with an RS256 header, and an RS384 header on a key declared RS256.
    with pytest.raises(Unauthenticated, match="does not fit"):
        make(server).authenticate(sign(claims(), RSA_KEY, "ec-1", "RS256"))
    with pytest.raises(Unauthenticated, match="does not fit"):
        make(server, algorithms=("RS256", "RS384")).authenticate(
            sign(claims(), RSA_KEY, "rsa-1", "RS384"))


def test_token_without_kid(server: JWKSServer) -> None:
    with pytest.raises(Unauthenticated, match="names no signing key"):
        make(server).authenticate(sign(claims(), kid=None))


def test_signature_by_another_key_with_a_known_kid(server: JWKSServer) -> None:
    with pytest.raises(Unauthenticated, match="signature invalid"):
        make(server).authenticate(sign(claims(), RSA_KEY_2, "rsa-1"))


def test_tampered_payload(server: JWKSServer) -> None:
    header, _, signature = sign(claims()).split(".")
    forged = b64(json.dumps(claims(sub="root", roles=["nc-admin"])).encode())
    with pytest.raises(Unauthenticated, match="signature invalid"):
        make(server).authenticate(f"{header}.{forged}.{signature}")


def test_symmetric_and_foreign_keys_in_the_jwks_are_ignored(server: JWKSServer) -> None:
    server.document = {"keys": [
        {"kty": "oct", "kid": "hmac", "k": b64(HMAC_SECRET)},
        {"kty": "RSA", "kid": "enc", "use": "enc", **RSAAlgorithm.to_jwk(
            RSA_KEY.public_key(), as_dict=True)},
        {"kid": 5}, "junk", rsa_jwk(RSA_KEY, "rsa-1")]}
    verifier = make(server)
    verifier.authenticate(sign(claims()))
    token = sign(claims(), HMAC_SECRET, "hmac", "HS256")
    with pytest.raises(Unauthenticated):
        verifier.authenticate(token)


# --- provider trouble ---------------------------------------------------------------------------

def test_provider_down_before_any_key_is_unavailable(server: JWKSServer) -> None:
    server.status = 500
    clock = FakeClock()
    verifier = make(server, clock)
    with pytest.raises(Unavailable):
        verifier.authenticate(sign(claims()))
    with pytest.raises(Unavailable):
        verifier.authenticate(sign(claims()))
    assert server.hits == 1  # failed fetches are rate-limited too
    server.status = 200
    clock.now += 30
    verifier.authenticate(sign(claims()))


def test_provider_down_later_keeps_the_known_keys(server: JWKSServer) -> None:
    clock = FakeClock()
    verifier = make(server, clock)
    verifier.authenticate(sign(claims()))
    server.status = 503
    clock.now += 1000
    verifier.authenticate(sign(claims()))
    assert server.hits == 2


@pytest.mark.parametrize("document", [[], {"keys": "x"}, {"nope": []}])
def test_bad_jwks_documents(server: JWKSServer, document: Any) -> None:
    server.document = document
    with pytest.raises(Unavailable):
        make(server).authenticate(sign(claims()))


def test_unreachable_jwks_url() -> None:
    config = OIDCConfig(issuer=ISSUER, audience=AUDIENCE, jwks_url="http://127.0.0.1:9/jwks")
    verifier = OIDCVerifier(config, RoleStore(MemoryRecords()),
                            JWKSCache(config.jwks_url, timeout=0.5))
    with pytest.raises(Unavailable):
        verifier.authenticate(sign(claims()))


# --- malformed tokens ------------------------------------------------------------------------

@pytest.mark.parametrize("token", [
    "", "a", "a.b", "a.b.c", "...", "eyJ.eyJ.x", handmade({"alg": "RS256"}, {}) + ".extra",
    handmade({"alg": ["RS256"], "kid": "rsa-1"}, claims()),
    handmade({"alg": "RS256", "kid": {"x": 1}}, claims()),
    b64(b"[1,2]") + "." + b64(b"{}") + ".",
    b64(b"\xff\xfe") + ".e30.",
    handmade({"alg": "RS256", "kid": "rsa-1"}, claims(), b"not a signature"),
    "x" * 20_000,
])
def test_malformed_tokens_are_typed_errors(server: JWKSServer, token: str) -> None:
    with pytest.raises(Unauthenticated) as err:
        make(server).authenticate(token)
    if len(token) > 5:
        assert token not in err.value.message


@pytest.fixture(scope="module")
def shared_verifier(server: JWKSServer) -> OIDCVerifier:
    return make(server)


@settings(max_examples=200, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(max_size=300) | st.builds(
    lambda h, p, s: f"{b64(h)}.{b64(p)}.{b64(s)}",
    st.binary(max_size=60) | st.just(b'{"alg":"RS256","kid":"rsa-1"}'),
    st.binary(max_size=60), st.binary(max_size=60)))
def test_fuzzed_tokens_raise_only_unauthenticated(shared_verifier: OIDCVerifier,
                                                 token: str) -> None:
    with pytest.raises(Unauthenticated):
        shared_verifier.authenticate(token)


# --- configuration and claim mapping ------------------------------------------------------------

@pytest.mark.parametrize("overrides", [
    {"algorithms": ("none",)}, {"algorithms": ("HS256",)}, {"algorithms": ()},
    {"jwks_url": "http://idp.example.test/jwks"}, {"jwks_url": "ftp://127.0.0.1/jwks"},
    {"role_mapping": {"boss": ADMIN}}, {"default_tenant": "Not A Tenant"},
])
def test_unsafe_configs_are_refused(overrides: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        OIDCConfig(**{"issuer": ISSUER, "audience": AUDIENCE,
                      "jwks_url": "https://idp.example.test/jwks", **overrides})


def test_plain_http_allowed_only_on_loopback() -> None:
    for url in ("http://127.0.0.1:8080/jwks", "http://localhost/jwks", "http://[::1]/jwks"):
        OIDCConfig(issuer=ISSUER, audience=AUDIENCE, jwks_url=url)


def test_claim_mapping(server: JWKSServer) -> None:
    roles = RoleStore(MemoryRecords())
    roles.bind(f"oidc:{ISSUER}#alice", VIEWER, "globex", created_by="x")
    verifier = make(server, roles=roles, roles_claim="realm_access.roles", tenant_claim="org",
                    default_tenant="default")
    nested = claims(org="initech", realm_access={"roles": ["nc-admin", "nc-viewer", 7]})
    who = verifier.authenticate(sign(nested))
    assert who.tenant == "initech"
    assert {(g.tenant, g.role) for g in who.grants} == {
        (ALL_TENANTS, ADMIN), ("initech", VIEWER), ("globex", VIEWER)}
    # No tenant claim: the default tenant; a space-separated string of roles works too.
    who = verifier.authenticate(sign(claims(realm_access={"roles": "nc-operator other"})))
    assert who.tenant == "default"
    assert ("default", OPERATOR) in {(g.tenant, g.role) for g in who.grants}


def test_a_tenant_claim_cannot_reach_every_tenant(server: JWKSServer) -> None:
    for bad in ("*", "ACME", 5, ["acme"]):
        who = make(server).authenticate(sign(claims(tenant=bad)))
        assert who.tenant is None
        assert who.grants == ()


def test_mapping_to_an_unknown_role_grants_nothing(server: JWKSServer) -> None:
    verifier = make(server, role_mapping={"nc-operator": "ghost"})
    assert verifier.authenticate(sign(claims())).grants == ()
