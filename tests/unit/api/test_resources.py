"""WasmPlugin: every field, every validation rule (with its exact path), the helpers."""

from __future__ import annotations

import pytest
import yaml

from wasmgate.api import (
    EnvValueSource,
    FailStrategy,
    ImagePullPolicy,
    Phase,
    PluginType,
    WasmPlugin,
    WorkloadMode,
)

from .helpers import errors_for, plugin

SHA_A = "a" * 64
SHA_B = "b" * 64
GATEWAY_REF = {"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": "g"}

FULL = f"""
apiVersion: extensions.istio.io/v1alpha1
kind: WasmPlugin
metadata:
  name: full.plugin
  namespace: team-a
  labels: {{app: demo}}
  annotations: {{owner: me}}
  creationTimestamp: "2024-02-03T04:05:06Z"
  resourceVersion: "42"
spec:
  selector:
    matchLabels: {{app: demo, version: v1}}
  url: oci://ghcr.io/org/plugin:v1
  sha256: {SHA_A}
  imagePullPolicy: Always
  imagePullSecret: pull-secret
  verificationKey: ignored
  pluginConfig:
    nested: {{list: [1, 2.5, true, null, "s"]}}
  pluginName: my_root
  phase: AUTHZ
  priority: -7
  failStrategy: FAIL_RELOAD
  vmConfig:
    env:
      - name: INLINE_VAR
        value: hello
      - name: HOST_VAR
        valueFrom: HOST
  match:
    - mode: SERVER
      ports: [{{number: 80}}, {{number: 443}}]
    - mode: CLIENT_AND_SERVER
  type: NETWORK
"""


def test_every_field_round_trips() -> None:
    source = yaml.safe_load(FULL)
    loaded = WasmPlugin.model_validate(source)
    dumped = loaded.to_dict()
    source["metadata"]["creationTimestamp"] = "2024-02-03T04:05:06Z"
    assert dumped == source
    assert WasmPlugin.model_validate(dumped) == loaded
    assert yaml.safe_load(yaml.safe_dump(dumped)) == dumped


def test_every_field_is_read() -> None:
    p = WasmPlugin.model_validate(yaml.safe_load(FULL))
    s = p.spec
    assert (p.namespace, p.name, p.filter_name) == ("team-a", "full.plugin", "team-a.full.plugin")
    assert p.metadata.resource_version == "42"
    assert s.selector is not None and s.selector.match_labels == {"app": "demo", "version": "v1"}
    assert s.image_pull_policy is ImagePullPolicy.ALWAYS
    assert s.image_pull_secret == "pull-secret"
    assert s.verification_key == "ignored"
    assert (s.phase, s.priority, s.fail_strategy) == (Phase.AUTHZ, -7, FailStrategy.FAIL_RELOAD)
    assert s.vm_config is not None
    assert [e.value_from for e in s.vm_config.env] == [EnvValueSource.INLINE, EnvValueSource.HOST]
    assert [m.mode for m in s.match] == [WorkloadMode.SERVER, WorkloadMode.CLIENT_AND_SERVER]
    assert [port.number for port in s.match[0].ports] == [80, 443]
    assert s.type is PluginType.NETWORK and p.plugin_type is PluginType.NETWORK
    assert p.root_id == "my_root"


def test_defaults() -> None:
    p = WasmPlugin.model_validate({"metadata": {"name": "x"}, "spec": {"url": "x/y"}})
    assert p.namespace == "default"
    assert p.spec.phase is Phase.UNSPECIFIED_PHASE
    assert p.spec.priority is None
    assert p.spec.fail_strategy is FailStrategy.FAIL_CLOSE
    assert p.spec.image_pull_policy is ImagePullPolicy.UNSPECIFIED_POLICY
    assert p.plugin_type is PluginType.HTTP
    assert p.root_id == ""
    assert p.to_dict() == {
        "apiVersion": "extensions.istio.io/v1alpha1",
        "kind": "WasmPlugin",
        "metadata": {"name": "x"},
        "spec": {"url": "x/y"},
    }


def test_enum_numbers_are_accepted() -> None:
    p = plugin(phase=3, imagePullPolicy=1, failStrategy=1, type=2, match=[{"mode": 3}])
    assert p.spec.phase is Phase.STATS
    assert p.spec.image_pull_policy is ImagePullPolicy.IF_NOT_PRESENT
    assert p.spec.fail_strategy is FailStrategy.FAIL_OPEN
    assert p.spec.type is PluginType.NETWORK
    assert p.spec.match[0].mode is WorkloadMode.CLIENT_AND_SERVER
    assert p.to_dict()["spec"]["phase"] == "STATS"


def test_server_metadata_and_status_are_accepted() -> None:
    p = plugin()
    doc = p.to_dict()
    doc["metadata"] |= {"uid": "u", "generation": 3, "managedFields": [{}]}
    doc["status"] = {"conditions": []}
    assert WasmPlugin.model_validate(doc).name == "p"


@pytest.mark.parametrize(
    ("spec", "path", "reason"),
    [
        ({"priority": "high"}, "spec.priority", "Input should be a valid integer"),
        ({"priority": 2**31}, "spec.priority", "less than or equal to 2147483647"),
        ({"priority": -(2**31) - 1}, "spec.priority", "greater than or equal to -2147483648"),
        ({"priorty": 1}, "spec.priorty", "did you mean 'priority'?"),
        ({"phase": "AUTH"}, "spec.phase", "'UNSPECIFIED_PHASE', 'AUTHN', 'AUTHZ' or 'STATS'"),
        ({"phase": 4}, "spec.phase", "not a valid Phase number (0..3)"),
        ({"imagePullPolicy": "Never"}, "spec.imagePullPolicy", "'IfNotPresent' or 'Always'"),
        ({"failStrategy": "FAIL_CLOSED"}, "spec.failStrategy", "'FAIL_OPEN' or 'FAIL_RELOAD'"),
        ({"type": "TCP"}, "spec.type", "'HTTP' or 'NETWORK'"),
        ({"url": ""}, "spec.url", "must not be empty"),
        ({"sha256": "ABC"}, "spec.sha256", "64 lowercase hex"),
        ({"sha256": "A" * 64}, "spec.sha256", "64 lowercase hex"),
        ({"imagePullSecret": ""}, "spec.imagePullSecret", "at least 1 character"),
        ({"imagePullSecret": "s" * 254}, "spec.imagePullSecret", "at most 253 characters"),
        ({"pluginName": ""}, "spec.pluginName", "at least 1 character"),
        ({"pluginName": "n" * 257}, "spec.pluginName", "at most 256 characters"),
        ({"pluginConfig": [1]}, "spec.pluginConfig", "must be a JSON object"),
        ({"pluginConfig": {"x": float("nan")}}, "spec.pluginConfig", "cannot be encoded"),
        ({"selector": {"matchLabels": {"": "x"}}}, "spec.selector.matchLabels[\"\"]", "empty key"),
        ({"selector": {"matchLabels": {"a*": "x"}}}, 'spec.selector.matchLabels["a*"]', "wildcard"),
        ({"selector": {"matchLabels": {"a": "x*"}}}, "spec.selector.matchLabels.a", "wildcard"),
        ({"selector": {"matchLabels": {"a": "v" * 64}}}, "spec.selector.matchLabels.a", "63"),
        ({"selector": {"labels": {}}}, "spec.selector.labels",
         "unknown field (known: matchLabels)"),
        ({"selector": {"matchLabels": {"a": "b"}}, "targetRefs": [GATEWAY_REF]},
         "spec", "at most one of selector, targetRef, targetRefs"),
        ({"targetRef": GATEWAY_REF, "targetRefs": [GATEWAY_REF]},
         "spec", "got ['targetRef', 'targetRefs']"),
        ({"targetRefs": [{"kind": "Gateway", "name": "g"}] * 17}, "spec.targetRefs", "at most 16"),
        ({"targetRefs": [{"name": "g"}]}, "spec.targetRefs[0].kind", "Field required"),
        ({"targetRefs": [{"kind": "Gateway"}]}, "spec.targetRefs[0].name", "Field required"),
        ({"targetRefs": [{"kind": "1x", "name": "g"}]}, "spec.targetRefs[0].kind", "pattern"),
        ({"targetRefs": [{"kind": "Pod", "name": "g"}]}, "spec.targetRefs[0].kind", "cannot be"),
        ({"targetRefs": [{"kind": "Gateway", "name": "g", "group": "Bad_Group"}]},
         "spec.targetRefs[0].group", "pattern"),
        ({"targetRefs": [{"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": "g",
                          "namespace": "other"}]},
         "spec.targetRefs[0].namespace", "cross namespace"),
        ({"targetRef": {"kind": "Gateway", "name": "g", "group": "x.io"}},
         "spec.targetRef.kind", "cannot be targeted"),
        ({"vmConfig": {"env": [{"name": "A"}, {"name": "B"}, {"name": "A"}]}},
         "spec.vmConfig.env[2].name", "duplicate env name 'A'"),
        ({"vmConfig": {"env": [{"name": "A"}, {"name": "H", "valueFrom": "HOST", "value": ""}]}},
         "spec.vmConfig.env[1].value", "only be set when valueFrom is INLINE"),
        ({"vmConfig": {"env": [{"name": ""}]}}, "spec.vmConfig.env[0].name", "at least 1"),
        ({"vmConfig": {"env": [{"name": "A", "value": "v" * 2049}]}},
         "spec.vmConfig.env[0].value", "at most 2048"),
        ({"vmConfig": {"env": [{"name": f"E{i}"} for i in range(257)]}},
         "spec.vmConfig.env", "at most 256"),
        ({"vmConfig": {"env": [{"name": "A", "valueFrom": "FILE"}]}},
         "spec.vmConfig.env[0].valueFrom", "'INLINE' or 'HOST'"),
        ({"vmConfig": {"envs": []}}, "spec.vmConfig.envs", "did you mean 'env'?"),
        ({"match": [{"mode": "BOTH"}]}, "spec.match[0].mode", "'CLIENT_AND_SERVER'"),
        ({"match": [{"ports": [{"number": 0}]}]}, "spec.match[0].ports[0].number",
         "greater than or equal to 1"),
        ({"match": [{"ports": [{"number": 65536}]}]}, "spec.match[0].ports[0].number", "65535"),
        ({"match": [{"ports": [{"number": "80"}]}]}, "spec.match[0].ports[0].number", "integer"),
        ({"match": [{"ports": [{"number": 80}, {"number": 81}, {"number": 80}]}]},
         "spec.match[0].ports[2].number", "duplicate port 80"),
        ({"match": [None]}, "spec.match[0]", "valid dictionary"),
    ],
)  # fmt: skip
def test_validation_rule(spec: dict[str, object], path: str, reason: str) -> None:
    errors = errors_for(**spec)
    assert len(errors) == 1, errors
    assert errors[0][0] == path
    assert reason in errors[0][1]


@pytest.mark.parametrize(
    ("meta", "path"),
    [
        ({"name": "Upper"}, "metadata.name"),
        ({"name": "a_b"}, "metadata.name"),
        ({"name": "x" * 254}, "metadata.name"),
        ({"name": "ok", "namespace": "a.b"}, "metadata.namespace"),
        ({"name": "ok", "creationTimestamp": "yesterday"}, "metadata.creationTimestamp"),
        ({"name": "ok", "nmae": "x"}, "metadata.nmae"),
        ({}, "metadata.name"),
    ],
)
def test_metadata_rules(meta: dict[str, object], path: str) -> None:
    doc = {"metadata": meta, "spec": {"url": "x/y"}}
    from pydantic import ValidationError

    with pytest.raises(ValidationError) as info:
        WasmPlugin.model_validate(doc)
    assert [".".join(map(str, e["loc"])) for e in info.value.errors()] == [path]


def test_plugin_configuration_bytes() -> None:
    config = {"b": 1.0, "a": {"z": [1, 2.5, 1e-7, 1e21, 2**60], "y": "é\n"}, "c": None, 404: "x"}
    expected = (
        '{"404":"x","a":{"y":"é\\n","z":[1,2.5,1e-7,1e+21,1152921504606847000]},"b":1,"c":null}'
    )
    assert plugin(pluginConfig=config).plugin_configuration_bytes() == expected.encode()
    assert plugin().plugin_configuration_bytes() == b""
    assert plugin(pluginConfig=None).plugin_configuration_bytes() == b""
    assert plugin(pluginConfig={"n": 0.00001, "m": -3}).plugin_configuration_bytes() == (
        b'{"m":-3,"n":0.00001}'
    )


def test_effective_env() -> None:
    env = [
        {"name": "INLINE", "value": "1"},
        {"name": "EMPTY"},
        {"name": "FROM_HOST", "valueFrom": "HOST"},
        {"name": "ABSENT", "valueFrom": "HOST"},
        {"name": "ISTIO_META_SECRET", "value": "dropped"},
        {"name": "ISTIO_META_HOSTKEY", "valueFrom": "HOST"},
    ]
    p = plugin(vmConfig={"env": env})
    host = {"FROM_HOST": "h", "INLINE": "ignored", "ISTIO_META_HOSTKEY": "kept", "OTHER": "x"}
    assert p.effective_env(host) == {
        "INLINE": "1",
        "EMPTY": "",
        "FROM_HOST": "h",
        "ISTIO_META_HOSTKEY": "kept",
    }
    assert plugin().effective_env(host) == {}


@pytest.mark.parametrize(
    ("url", "scheme", "resolved"),
    [
        ("ghcr.io/org/plugin:v1", "oci", "oci://ghcr.io/org/plugin:v1"),
        ("10.0.0.1:5000/plugin:v1", "oci", "oci://10.0.0.1:5000/plugin:v1"),
        ("plugin", "oci", "oci://plugin"),
        ("oci://localhost:5000/plugin:v1", "oci", "oci://localhost:5000/plugin:v1"),
        ("OCI://ghcr.io/x", "oci", "oci://ghcr.io/x"),
        ("file:///opt/p.wasm", "file", "file:///opt/p.wasm"),
        ("file://relative.wasm", "file", "file://relative.wasm"),
        ("http://host/p.wasm", "http", "http://host/p.wasm"),
        ("https://host:8443/p.wasm?x=1", "https", "https://host:8443/p.wasm?x=1"),
    ],
)
def test_url_resolution(url: str, scheme: str, resolved: str) -> None:
    p = plugin(url=url)
    assert p.url_scheme == scheme
    assert p.resolved_url() == resolved


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("localhost:5000/plugin:v1", "unsupported scheme 'localhost'"),
        ("myregistry:5000/p", "oci://myregistry:5000/p"),
        ("ftp://host/p.wasm", "unsupported scheme 'ftp'"),
        ("/opt/p.wasm", "write file:///opt/p.wasm"),
        ("oci://", "has no host"),
        ("https:///p.wasm", "has no host"),
        ("file://", "no path"),
        ("file:/p.wasm", "expected file://"),
        ("ghcr.io/org/p v1", "spaces"),
        (":foo", "missing protocol scheme"),
        ("oci://ghcr.io/x@sha256:abc", "64 lowercase hex"),
    ],
)
def test_url_rules(url: str, reason: str) -> None:
    errors = errors_for(url=url)
    assert len(errors) == 1 and errors[0][0] == "spec.url", errors
    assert reason in errors[0][1]


def test_sha256_and_url_digest() -> None:
    digest_url = f"oci://ghcr.io/org/p@sha256:{SHA_A}"
    assert errors_for(url=digest_url, sha256=SHA_A) == []
    assert errors_for(url=digest_url, sha256=SHA_B) == [
        ("spec.sha256", f"{SHA_B} does not match the url's @sha256:{SHA_A}")
    ]
    assert plugin(url=digest_url).pinned_sha256() == SHA_A
    assert plugin(url="oci://x/y:v1", sha256=SHA_B).pinned_sha256() == SHA_B
    assert plugin(url="https://h/p.wasm").pinned_sha256() is None


@pytest.mark.parametrize(
    ("url", "policy", "effective"),
    [
        ("oci://ghcr.io/org/p:latest", None, "Always"),
        ("ghcr.io/org/p:latest", None, "Always"),
        ("oci://ghcr.io/org/p:v1", None, "IfNotPresent"),
        ("oci://ghcr.io/org/p", None, "IfNotPresent"),
        ("oci://ghcr.io/org/latest", None, "IfNotPresent"),
        (f"oci://ghcr.io/org/p:latest@sha256:{SHA_A}", None, "IfNotPresent"),
        ("https://h/p.wasm:latest", None, "IfNotPresent"),
        ("file:///p:latest", None, "IfNotPresent"),
        ("oci://ghcr.io/org/p:latest", "IfNotPresent", "IfNotPresent"),
        ("oci://ghcr.io/org/p:v1", "Always", "Always"),
        ("https://h/p.wasm", "Always", "Always"),
        ("oci://ghcr.io/org/p:latest", "UNSPECIFIED_POLICY", "Always"),
    ],
)
def test_pull_policy(url: str, policy: str | None, effective: str) -> None:
    spec = {"url": url} | ({"imagePullPolicy": policy} if policy else {})
    assert plugin(**spec).pull_policy_effective().value == effective


def test_revision() -> None:
    assert plugin().revision() == plugin(created=99).revision()
    assert plugin().revision() != plugin(priority=1).revision()
    versioned = plugin().model_copy(deep=True)
    versioned.metadata.resource_version = "17"
    assert versioned.revision() == "17"


def test_legacy_target_ref_is_used_when_target_refs_empty() -> None:
    ref = {"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": "edge"}
    assert [r.name for r in plugin(targetRef=ref).target_refs()] == ["edge"]
    assert plugin().target_refs() == []
