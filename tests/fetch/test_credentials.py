"""Pull secrets: docker config JSON in every shape Istio's agent accepts, and no leaks."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from wasmgate.fetch.credentials import (
    ANONYMOUS,
    Credentials,
    DockerConfig,
    credentials_for,
    default_docker_config,
    load_pull_secret,
    normalize_registry,
    parse_docker_config,
)
from wasmgate.fetch.errors import AuthError

pytestmark = pytest.mark.usefixtures("no_docker_config")


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


CONFIG = {
    "auths": {
        "https://index.docker.io/v1/": {"auth": b64("hubuser:hub:pass")},
        "ghcr.io": {"username": "gh", "password": "gh-pass"},
        "registry.example.com:5000": {"identitytoken": "refresh-tok"},
        "http://other.example/v2/": {"registrytoken": "bearer-tok"},
        "empty.example": {},
        "nulled.example": None,
    }
}


def test_parse_every_field() -> None:
    config = parse_docker_config(json.dumps(CONFIG))
    assert config.for_registry("index.docker.io") == Credentials("hubuser", "hub:pass")
    assert config.for_registry("docker.io") == config.for_registry("registry-1.docker.io")
    assert config.for_registry("GHCR.io") == Credentials("gh", "gh-pass")
    assert config.for_registry("registry.example.com:5000") == Credentials(
        identity_token="refresh-tok")
    assert config.for_registry("registry.example.com") is ANONYMOUS  # the port matters
    assert config.for_registry("other.example") == Credentials(registry_token="bearer-tok")
    assert config.for_registry("empty.example").anonymous
    assert config.for_registry("nulled.example").anonymous
    assert config.for_registry("unknown.example").anonymous


def test_username_and_password_win_over_auth() -> None:
    config = parse_docker_config(json.dumps(
        {"auths": {"r.io": {"auth": b64("a:b"), "username": "u", "password": "p"}}}))
    assert config.for_registry("r.io") == Credentials("u", "p")


def test_legacy_dockercfg_shape() -> None:
    config = parse_docker_config(json.dumps({"r.io": {"auth": b64("u:p"), "email": "x@y"}}))
    assert config.for_registry("r.io") == Credentials("u", "p")


@pytest.mark.parametrize(("text", "message"), [
    ("null", "is null"),
    ("[1, 2]", "not a docker config"),
    ('{"auths": "nope"}', "'auths' is not an object"),
    ('{"auths": {"r.io": {"auth": "%%%not-base64"}}}', "not base64"),
    ('{"auths": {"r.io": {"auth": "' + b64("no-colon") + '"}}}', "not user:password"),
    ('{"auths": {"r.io": {"password": 12}}}', "not a string"),
    ('{"auths": {"r.io": "s3cr3t-in-a-string"}}', "not an object"),
    ('{"auths": {"r.io": {"password": "s3cr3t-typo"}', "not valid JSON"),
])
def test_bad_secrets_are_auth_errors_without_their_content(text: str, message: str) -> None:
    with pytest.raises(AuthError, match=message) as caught:
        parse_docker_config(text)
    assert "s3cr3t" not in str(caught.value) and "not-base64" not in str(caught.value)


def test_repr_never_shows_secrets() -> None:
    creds = Credentials("alice", "pa55-word", identity_token="id-tok", registry_token="reg-tok")
    for text in (repr(creds), str(creds), f"{creds}", repr([creds])):
        assert "alice" in text
        assert not any(s in text for s in ("pa55-word", "id-tok", "reg-tok", b64("alice:")))
    assert repr(Credentials()) == "Credentials(anonymous)"
    config = parse_docker_config(json.dumps(CONFIG))
    assert "hub:pass" not in repr(config) and "gh-pass" not in str(config)
    assert "ghcr.io" in repr(config)


def test_basic_header() -> None:
    assert Credentials("u", "p:w").basic_header() == "Basic " + b64("u:p:w")


def test_load_from_file_directory_and_json(tmp_path: Path) -> None:
    text = json.dumps(CONFIG)
    file = tmp_path / "config.json"
    file.write_text(text)
    secret_dir = tmp_path / "secret"  # kubernetes.io/dockerconfigjson mounted as a volume
    secret_dir.mkdir()
    (secret_dir / ".dockerconfigjson").write_text(text)
    legacy_dir = tmp_path / "legacy"  # kubernetes.io/dockercfg
    legacy_dir.mkdir()
    (legacy_dir / ".dockercfg").write_text(json.dumps(CONFIG["auths"]))
    for secret in (text, f"  {text}\n", str(file), file, str(secret_dir), str(legacy_dir)):
        config = load_pull_secret(secret)  # type: ignore[arg-type]
        assert config.for_registry("ghcr.io") == Credentials("gh", "gh-pass"), secret
    assert load_pull_secret(str(secret_dir)).source.endswith(".dockerconfigjson")


def test_load_errors(tmp_path: Path) -> None:
    with pytest.raises(AuthError, match="does not exist"):
        load_pull_secret(str(tmp_path / "missing"))
    with pytest.raises(AuthError, match="holds none of"):
        load_pull_secret(str(tmp_path))
    with pytest.raises(AuthError, match="is null"):
        load_pull_secret("null")
    (tmp_path / "null.json").write_text("null")
    with pytest.raises(AuthError, match="is null"):
        load_pull_secret(str(tmp_path / "null.json"))


def test_fallback_to_docker_config_env_then_home(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    assert default_docker_config().auths == {}
    assert load_pull_secret(None).auths == {} and load_pull_secret("").auths == {}
    home = tmp_path / "home"
    (home / ".docker").mkdir(parents=True)
    (home / ".docker" / "config.json").write_text(
        json.dumps({"auths": {"r.io": {"auth": b64("home:pw")}}}))
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "nothing-here"))
    assert credentials_for("r.io") == Credentials("home", "pw")
    env_dir = tmp_path / "env"
    env_dir.mkdir()
    (env_dir / "config.json").write_text(json.dumps({"auths": {"r.io": {"auth": b64("env:pw")}}}))
    monkeypatch.setenv("DOCKER_CONFIG", str(env_dir))
    assert credentials_for("r.io") == Credentials("env", "pw")
    assert credentials_for("r.io", "") == Credentials("env", "pw")
    assert credentials_for("other.io").anonymous


def test_credentials_for_accepts_what_callers_hold() -> None:
    explicit = Credentials("x", "y")
    assert credentials_for("r.io", explicit) is explicit
    config = DockerConfig({"r.io": explicit})
    assert credentials_for("r.io", config) is explicit
    assert credentials_for("docker.io", json.dumps(CONFIG)).username == "hubuser"


@pytest.mark.parametrize(("key", "host"), [
    ("https://index.docker.io/v1/", "docker.io"), ("registry-1.docker.io", "docker.io"),
    ("http://Reg.IO:5000/v2/", "reg.io:5000"), ("ghcr.io", "ghcr.io"),
])
def test_normalize_registry(key: str, host: str) -> None:
    assert normalize_registry(key) == host
