"""Loading files and directories; errors that name file, document, object and field."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import yaml

from wasmgate.api import ConfigError, ConfigErrors, Phase, load_paths, load_text

from .helpers import T0, load_docs, plugin_doc

DATA = Path(__file__).parent / "data"
GATEWAY = {"apiVersion": "wasmgate.io/v1alpha1", "kind": "Gateway", "metadata": {"name": "gw"}}


def test_sample_loads() -> None:
    result = load_paths([DATA / "sample.yaml"], now=T0)
    assert result.errors == []
    assert result.gateway is not None and result.gateway.name == "edge"
    assert [p.filter_name for p in result.plugins] == [
        "istio-system.openid-connect",
        "shop.basic-auth",
        "shop.header-stats",
    ]
    assert [p.spec.phase for p in result.plugins] == [Phase.AUTHN, Phase.AUTHZ, Phase.STATS]


def test_one_bad_document_does_not_stop_the_others() -> None:
    text = yaml.safe_dump_all(
        [plugin_doc("a"), plugin_doc("foo", priority="high"), plugin_doc("c")], sort_keys=False
    )
    result = load_text(text, "plugins.yaml", now=T0)
    assert [p.name for p in result.plugins] == ["a", "c"]
    assert [str(e) for e in result.errors] == [
        "plugins.yaml: document 2 (WasmPlugin default/foo): spec.priority: "
        "Input should be a valid integer (line 15)"
    ]
    error = result.errors[0]
    assert (error.file, error.document_index, error.kind, error.name) == (
        "plugins.yaml",
        1,
        "WasmPlugin",
        "default/foo",
    )
    assert (error.path, error.line) == ("spec.priority", 15)


def test_all_errors_of_a_document_are_reported() -> None:
    result = load_docs(plugin_doc("x", priority="a", phase="NOPE", url=""))
    assert sorted(e.path for e in result.errors) == ["spec.phase", "spec.priority", "spec.url"]


def test_document_level_errors() -> None:
    text = """\
kind: Mystery
apiVersion: x/v1
metadata: {name: m}
---
# only a comment: an empty document is skipped
---
- a list
---
apiVersion: extensions.istio.io/v1beta1
kind: WasmPlugin
metadata: {name: b, namespace: ns}
spec: {url: x/y}
---
metadata: {name: nokind}
---
apiVersion: extensions.istio.io/v1alpha1
kind: WasmPlugin
metadata: {name: when, creationTimestamp: 2024-01-01}
spec: {url: x/y, url: z/w}
---
apiVersion: extensions.istio.io/v1alpha1
kind: WasmPlugin
metadata: {name: after}
spec: {url: x/y, priority: "1"}
"""
    errors = load_text(text, "f.yaml").errors
    assert [str(e) for e in errors] == [
        "f.yaml: document 1 (Mystery m): kind: unknown kind 'Mystery' (line 1)",
        "f.yaml: document 3: a document must be a mapping (line 7)",
        "f.yaml: document 4 (WasmPlugin ns/b): apiVersion: WasmPlugin needs apiVersion "
        "extensions.istio.io/v1alpha1, not 'extensions.istio.io/v1beta1' (line 9)",
        "f.yaml: document 5 (nokind): kind: missing kind (line 14)",
        "f.yaml: document 6: invalid YAML: duplicate or unhashable key 'url' (line 19)",
        "f.yaml: document 7 (WasmPlugin default/after): spec.priority: "
        "Input should be a valid integer (line 24)",
    ]


def test_yaml_syntax_error_keeps_earlier_documents() -> None:
    text = yaml.safe_dump(plugin_doc("good")) + "---\nspec: [unclosed\n"
    result = load_text(text, "broken.yaml")
    assert [p.name for p in result.plugins] == ["good"]
    [error] = result.errors
    assert error.document_index == 1 and error.reason.startswith("invalid YAML")


def test_timestamps_stay_strings_in_plugin_config() -> None:
    result = load_docs(plugin_doc(pluginConfig={"since": "2024-01-01"}))
    text = "apiVersion: extensions.istio.io/v1alpha1\nkind: WasmPlugin\nmetadata: {name: d}\n"
    text += "spec:\n  url: x/y\n  pluginConfig: {since: 2024-01-01, on: yes, 404: page}\n"
    result = load_text(text)
    assert result.errors == []
    assert result.plugins[0].plugin_configuration_bytes() == (
        b'{"404":"page","since":"2024-01-01","true":true}'
    )


def test_duplicates_are_errors_on_the_later_one(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(yaml.safe_dump_all([plugin_doc("dup"), GATEWAY]))
    (tmp_path / "b.yaml").write_text(
        yaml.safe_dump_all(
            [plugin_doc("dup", priority=1), plugin_doc("dup", namespace="other"), GATEWAY]
        )
    )
    result = load_paths([tmp_path], now=T0)
    assert [(p.namespace, p.spec.priority) for p in result.plugins] == [
        ("default", None),
        ("other", None),
    ]
    assert len(result.gateways) == 1
    a, b = str(tmp_path / "a.yaml"), str(tmp_path / "b.yaml")
    assert [str(e) for e in result.errors] == [
        f"{b}: document 1 (WasmPlugin default/dup): duplicate WasmPlugin; the first is "
        f"{a}: document 1 (WasmPlugin default/dup) (line 1)",
        f"{b}: document 3 (Gateway gw): a second Gateway; the first is "
        f"{a}: document 2 (Gateway gw) (line 18)",
    ]


def test_directory_loading(tmp_path: Path) -> None:
    (tmp_path / "z.yaml").write_text(yaml.safe_dump(plugin_doc("z")))
    (tmp_path / "a.yml").write_text(yaml.safe_dump(plugin_doc("a")))
    (tmp_path / "nested" / "deeper").mkdir(parents=True)
    (tmp_path / "nested" / "deeper" / "m.json").write_text(json.dumps(plugin_doc("m")))
    (tmp_path / "nested" / "b.yaml").write_text(yaml.safe_dump(plugin_doc("b")))
    (tmp_path / "notes.txt").write_text("not config")
    (tmp_path / ".hidden.yaml").write_text(yaml.safe_dump(plugin_doc("hidden")))
    (tmp_path / "..data").mkdir()
    (tmp_path / "..data" / "z.yaml").write_text(yaml.safe_dump(plugin_doc("z")))
    result = load_paths([tmp_path], now=T0)
    assert result.errors == []
    assert [p.name for p in result.plugins] == ["a", "b", "m", "z"]


def test_explicit_files_any_suffix_and_missing_paths(tmp_path: Path) -> None:
    conf = tmp_path / "plugins.conf"
    conf.write_text(yaml.safe_dump(plugin_doc("c")))
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("{\n  nope")
    result = load_paths([conf, str(tmp_path / "missing.yaml"), bad_json])
    assert [p.name for p in result.plugins] == ["c"]
    assert [(e.document_index, e.reason.split(":")[0]) for e in result.errors] == [
        (None, "no such file or directory"),
        (0, "invalid JSON"),
    ]
    assert str(result.errors[0]) == f"{tmp_path / 'missing.yaml'}: no such file or directory"


def test_kubectl_list_output() -> None:
    listing = {
        "apiVersion": "v1",
        "kind": "List",
        "items": [plugin_doc("one"), plugin_doc("two", priority="x")],
    }
    result = load_docs(listing)
    assert [p.name for p in result.plugins] == ["one"]
    assert [e.path for e in result.errors] == ["items[1].spec.priority"]
    assert result.errors[0].name == "default/two"


def test_creation_time_is_assigned_in_load_order() -> None:
    stamped = plugin_doc("stamped")
    stamped["metadata"]["creationTimestamp"] = "2020-01-01T00:00:00"
    result = load_docs(plugin_doc("first"), stamped, plugin_doc("second"))
    times = {p.name: p.metadata.creation_timestamp for p in result.plugins}
    assert times == {
        "first": T0,
        "stamped": datetime(2020, 1, 1, tzinfo=UTC),
        "second": T0 + timedelta(microseconds=1),
    }


def test_raise_for_errors() -> None:
    good = load_docs(plugin_doc())
    assert good.ok
    good.raise_for_errors()
    bad = load_docs(plugin_doc(priority="x"))
    with pytest.raises(ConfigErrors) as info:
        bad.raise_for_errors()
    assert "spec.priority" in str(info.value)
    assert isinstance(info.value.errors[0], ConfigError)


def test_load_result_without_gateway() -> None:
    assert load_docs(plugin_doc()).gateway is None


def test_a_same_named_kind_of_another_api_is_skipped_not_ours() -> None:
    text = """apiVersion: networking.istio.io/v1beta1
kind: Gateway
metadata: {name: ingress}
spec: {selector: {istio: ingressgateway}}
---
apiVersion: wasmgate.io/v1beta9
kind: Gateway
metadata: {name: ours}
"""
    errors = load_text(text, "f.yaml").errors
    assert [str(e) for e in errors] == [
        "f.yaml: document 1 (networking.istio.io/v1beta1/Gateway ingress): apiVersion: "
        "networking.istio.io/v1beta1 Gateway is not a wasmgate resource (skipped) (line 1)",
        "f.yaml: document 2 (Gateway ours): apiVersion: Gateway needs apiVersion "
        "wasmgate.io/v1alpha1, not 'wasmgate.io/v1beta9' (line 6)",
    ]
    assert [e.kind for e in errors] == ["networking.istio.io/v1beta1/Gateway", "Gateway"]
