"""tasks/adapters/postgres.py scram_verifier / scram_matches: known answers, structure, refusals."""

from __future__ import annotations

import base64
import hashlib
import hmac
import re

import pytest

from tasks.adapters.postgres import scram_matches, scram_verifier

SALT = b"0123456789abcdef"
# Computed independently with OpenSSL 3 (not with this module):
#   salted=$(openssl kdf -keylen 32 -kdfopt digest:SHA256 -kdfopt pass:pencil \
#            -kdfopt salt:0123456789abcdef -kdfopt iter:4096 PBKDF2 | tr -d :)
#   StoredKey = sha256(HMAC(salted, "Client Key")), ServerKey = HMAC(salted, "Server Key")
PENCIL = (
    "SCRAM-SHA-256$4096:MDEyMzQ1Njc4OWFiY2RlZg=="
    "$nQpbZ77WudtqufPwikHXGRt6g2QJ4zns8bZLw273DRM="
    ":jn2amWP1q1h+jgjy0YTO14S6/F02SV7taipOeB7ef20="
)
STRUCTURE = re.compile(
    r"^SCRAM-SHA-256\$(?P<iter>[0-9]+):(?P<salt>[A-Za-z0-9+/]+={0,2})"
    r"\$(?P<stored>[A-Za-z0-9+/]{43}=):(?P<server>[A-Za-z0-9+/]{43}=)$"
)


def test_known_answer() -> None:
    assert scram_verifier("pencil", salt=SALT, iterations=4096) == PENCIL


def test_structure() -> None:
    m = STRUCTURE.fullmatch(scram_verifier("pencil", salt=SALT, iterations=4096))
    assert m is not None
    assert m["iter"] == "4096"
    assert base64.b64decode(m["salt"]) == SALT
    assert len(base64.b64decode(m["stored"])) == 32
    assert len(base64.b64decode(m["server"])) == 32


def test_rfc7677_test_vector() -> None:
    """RFC 7677 section 3: user 'user', password 'pencil'. The verifier must reproduce the RFC's
    ServerSignature and accept the RFC's ClientProof for that exchange."""
    salt = base64.b64decode("W22ZaJ0SNY7soEsUEjb6gQ==")
    verifier = scram_verifier("pencil", salt=salt, iterations=4096)
    m = STRUCTURE.fullmatch(verifier)
    assert m is not None
    stored_key, server_key = base64.b64decode(m["stored"]), base64.b64decode(m["server"])
    auth_message = (
        b"n=user,r=rOprNGfwEbeRWgbNEkqO,"
        b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096,"
        b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0"
    )
    server_signature = hmac.new(server_key, auth_message, "sha256").digest()
    assert base64.b64encode(server_signature).decode() == "6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="
    client_proof = base64.b64decode("dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=")
    client_signature = hmac.new(stored_key, auth_message, "sha256").digest()
    client_key = bytes(a ^ b for a, b in zip(client_proof, client_signature))
    assert hashlib.sha256(client_key).digest() == stored_key
    assert scram_matches(verifier, "pencil")


@pytest.mark.parametrize("iterations", [1, 4096, 10000])
def test_iterations_in_verifier(iterations: int) -> None:
    v = scram_verifier("pencil", salt=SALT, iterations=iterations)
    assert v.startswith(f"SCRAM-SHA-256${iterations}:MDEyMzQ1Njc4OWFiY2RlZg==$")
    assert scram_matches(v, "pencil")
    assert (v == PENCIL) is (iterations == 4096)


def test_random_salt_differs_and_matches() -> None:
    a, b = scram_verifier("pencil"), scram_verifier("pencil")
    assert a != b
    for v in (a, b):
        m = STRUCTURE.fullmatch(v)
        assert m is not None and m["iter"] == "4096"
        assert len(base64.b64decode(m["salt"])) == 16
        assert scram_matches(v, "pencil")


@pytest.mark.parametrize(
    ("verifier", "password", "expected"),
    [
        (PENCIL, "pencil", True),
        (PENCIL, "Pencil", False),
        (PENCIL, "pencil ", False),
        (PENCIL, "", False),
        (PENCIL, "pen", False),
        (scram_verifier("", salt=SALT), "", True),
        (scram_verifier("ünïcødé €", salt=SALT), "ünïcødé €", True),
        ("md5" + hashlib.md5(b"pencilpostgres").hexdigest(), "pencil", False),
        ("pencil", "pencil", False),  # a plaintext rolpassword is not a SCRAM verifier
        (None, "pencil", False),
        ("", "pencil", False),
        ("garbage", "pencil", False),
        ("SCRAM-SHA-256$", "pencil", False),
        ("SCRAM-SHA-256$4096$x:y", "pencil", False),
        ("SCRAM-SHA-256$4096:MDEy$YQ==", "pencil", False),
        ("SCRAM-SHA-256$x:MDEy$YQ==:YQ==", "pencil", False),
        ("SCRAM-SHA-256$0:MDEy$YQ==:YQ==", "pencil", False),
        ("SCRAM-SHA-256$-1:MDEy$YQ==:YQ==", "pencil", False),
        ("SCRAM-SHA-256$4096:!!!$YQ==:YQ==", "pencil", False),
        (PENCIL + "$extra", "pencil", False),
        (PENCIL.replace("SCRAM-SHA-256", "SCRAM-SHA-1"), "pencil", False),
        (PENCIL.replace("$4096:", "$4097:"), "pencil", False),
        # stored and server key swapped
        ("SCRAM-SHA-256$4096:MDEyMzQ1Njc4OWFiY2RlZg==$jn2amWP1q1h+jgjy0YTO14S6/F02SV7taipOeB7ef20="
         ":nQpbZ77WudtqufPwikHXGRt6g2QJ4zns8bZLw273DRM=", "pencil", False),
    ],
    ids=["right", "case", "trailing-space", "empty", "prefix", "empty-password", "unicode", "md5", "plaintext", "none",
         "empty-verifier", "garbage", "prefix-only", "no-colon-keys", "no-server-key", "bad-iterations",
         "zero-iterations", "negative-iterations", "bad-salt-chars", "extra-field", "sha1", "other-iterations",
         "keys-swapped"],
)
def test_scram_matches(verifier: str | None, password: str, expected: bool) -> None:
    assert scram_matches(verifier, password) is expected


@pytest.mark.parametrize(
    "verifier",
    [
        "SCRAM-SHA-256$4096:MDEyMzQ1Njc4OWFiY2RlZg==$abc:abc",
        "SCRAM-SHA-256$4096:MDEyMzQ1Njc4OWFiY2RlZg==$nQpbZ77WudtqufPwikHXGRt6g2QJ4zns8bZLw273DRM=:x",
    ],
    ids=["both-keys-bad", "server-key-bad"],
)
def test_scram_matches_bad_base64_key_is_false(verifier: str) -> None:
    assert scram_matches(verifier, "pencil") is False
