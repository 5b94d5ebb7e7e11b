"""`wasmgate validate`: the configuration checked as `run` loads it, and the chain it gives,
with nothing fetched or started."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from wasmgate.cli import main

GATEWAY = """apiVersion: wasmgate.io/v1alpha1
kind: Gateway
metadata: {name: edge}
spec:
  labels: {app: edge}
  clusters: [{name: backend, endpoints: ["127.0.0.1:9000"]}]
  routes: [{name: api, cluster: backend}]
"""


def plugin(name: str, spec: str) -> str:
    return (f"---\napiVersion: extensions.istio.io/v1alpha1\nkind: WasmPlugin\n"
            f"metadata: {{name: {name}}}\nspec: {{url: 'file:///{name}.wasm', {spec}}}\n")


def validate(tmp_path: Path, text: str, *args: str) -> tuple[int, str]:
    config = tmp_path / "config.yaml"
    config.write_text(text)
    result = CliRunner().invoke(main, ["validate", "-c", str(config), *args])
    return result.exit_code, result.output


def test_the_chain_in_istio_order(tmp_path: Path) -> None:
    text = (GATEWAY + plugin("stats", "phase: STATS")
            + plugin("authn", "phase: AUTHN, priority: 5, failStrategy: FAIL_OPEN")
            + plugin("unset", "phase: AUTHN")
            + plugin("web", "selector: {matchLabels: {app: web}}")
            + "---\napiVersion: networking.istio.io/v1beta1\nkind: Gateway\n"
              "metadata: {name: istio-gw}\nspec: {}\n")
    code, out = validate(tmp_path, text, "--json")
    assert code == 0, out
    report = json.loads(out)
    assert [(p["name"], p["phase"], p["priority"]) for p in report["chain"]] == [
        ("default.authn", "AUTHN", 5), ("default.unset", "AUTHN", None),
        ("default.stats", "STATS", None)]
    assert report["not_selected"] == ["default.web"]
    assert "selector or targetRefs do not take gateway edge" in (
        report["why_not_selected"]["default.web"])
    assert len(report["skipped"]) == 1 and "not a wasmgate resource" in report["skipped"][0]
    assert report["errors"] == []
    code, out = validate(tmp_path, text)
    assert code == 0
    assert "  1. default.authn  AUTHN  priority 5  FAIL_OPEN  file:///authn.wasm" in out
    assert "  default.web: its namespace, selector or targetRefs do not take gateway" in out


def test_errors_exit_2_naming_file_document_and_field(tmp_path: Path) -> None:
    text = (GATEWAY.replace("  routes:", "  accessLog: {format: '%NOPE%'}\n  routes:")
            + plugin("good", "phase: STATS") + plugin("bad", "phase: SOMETIMES"))
    code, out = validate(tmp_path, text)
    assert code == 2
    assert "document 1 (Gateway edge): spec.accessLog.format: %NOPE%" in out
    assert "document 3 (WasmPlugin default/bad): spec.phase" in out
    # no chain made up from a default Gateway: it depends on the broken document
    assert "no chain: the Gateway document has errors" in out and "chain (Istio" not in out


def test_a_configuration_with_nothing_of_ours_is_refused_as_run_refuses_it(
        tmp_path: Path) -> None:
    code, out = validate(tmp_path, "apiVersion: v1\nkind: Service\nmetadata: {name: s}\n")
    assert code == 2
    assert "no WasmPlugin or Gateway document in the configuration" in out
