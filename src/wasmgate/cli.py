"""The ``wasmgate`` command line: a small click group; each subcommand renders its own output."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import NoReturn

import click
from rich.console import Console
from rich.table import Table
from rich.text import Text

from .inspection import Inspection, MemoryEntry, inspect_module
from .runtime.binary import WasmBinaryError

EXIT_OK, EXIT_CANNOT_RUN, EXIT_BAD_INPUT = 0, 1, 2


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="wasmgate", prog_name="wasmgate")
def main() -> None:
    """wasmgate: a Proxy-Wasm plugin host."""


# -- inspect ---------------------------------------------------------------------------------


@main.command()
@click.argument("file", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the inspection as JSON.")
def inspect(file: Path, as_json: bool) -> None:
    """Describe a .wasm plugin and check that this host can run it.

    Exit status: 0 runnable here, 1 not runnable (ABI or imports), 2 unreadable/malformed.
    """
    try:
        data = file.read_bytes()
    except OSError as exc:
        _fail(f"{file}: cannot read: {exc.strerror or exc}")
    try:
        result = inspect_module(data, str(file))
    except WasmBinaryError as exc:
        _fail(f"{file}: malformed wasm module: {exc}")
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2))
    else:
        # Piped output has no terminal width to follow: use one wide enough for signatures.
        width = None if sys.stdout.isatty() else 120
        _render(result, Console(highlight=False, width=width))
    raise SystemExit(EXIT_OK if result.runnable else EXIT_CANNOT_RUN)


def _fail(message: str) -> NoReturn:
    click.echo(f"wasmgate: error: {message}", err=True)
    raise SystemExit(EXIT_BAD_INPUT)


def _pages(n: int) -> str:
    size = n * 64
    unit = "KiB"
    if size >= 1024 and size % 1024 == 0:
        size, unit = size // 1024, "MiB"
    return f"{n} page{'s' if n != 1 else ''} ({size} {unit})"


def _memory_text(m: MemoryEntry) -> str:
    maximum = "unbounded" if m.maximum is None else _pages(m.maximum)
    flags = "".join([", shared" if m.shared else "", ", memory64" if m.memory64 else ""])
    return f"{m.origin}: min {_pages(m.minimum)}, max {maximum}{flags}"


def _yes(flag: bool) -> Text:
    return Text("yes", style="green") if flag else Text("no", style="yellow")


def _summary(r: Inspection) -> Table:
    t = Table.grid(padding=(0, 2))
    t.add_column(style="bold")
    t.add_column(overflow="fold")
    t.add_row("File", r.source)
    t.add_row("Size", f"{r.size} bytes")
    t.add_row("SHA-256", Text(r.sha256, no_wrap=True))
    abi = Text(r.abi_version, style="green") if r.abi_version else Text("none", style="red")
    if len(r.abi_exports) > 1:
        abi.append(f" (exports {', '.join(r.abi_exports)})")
    t.add_row("Proxy-Wasm ABI", abi)
    t.add_row("SDK / language", r.sdk)
    for sdk, evidence in r.sdk_evidence:
        t.add_row("", f"{sdk}: {'; '.join(evidence)}")
    for m in r.memories:
        t.add_row("Memory", _memory_text(m))
    if not r.memories:
        t.add_row("Memory", "none")
    t.add_row("Exports memory", _yes(r.exports_memory))
    t.add_row("DWARF debug info", _yes(r.has_dwarf))
    names = f" ({r.function_names} function names)" if r.has_name_section else ""
    name_cell = _yes(r.has_name_section)
    name_cell.append(names)
    t.add_row("Name section", name_cell)
    if r.producers:
        for field, values in r.producers:
            tools = ", ".join(f"{n} {v}".strip() for n, v in values)
            t.add_row(f"Producers: {field}", tools or "-")
    else:
        t.add_row("Producers", "none")
    return t


def _imports_table(r: Inspection) -> Table:
    t = Table(title=f"Imports ({len(r.imports)})", title_justify="left", expand=False)
    t.add_column("Import", overflow="fold")
    t.add_column("Signature", overflow="fold")
    t.add_column("Status", overflow="fold")
    for imp in r.satisfied_imports:
        t.add_row(imp.qualname, imp.signature or imp.kind, Text("satisfied", style="green"))
    for imp in r.unsatisfied_imports:
        status = Text(f"NOT satisfied ({imp.reason})", style="bold red")
        t.add_row(imp.qualname, imp.signature or imp.kind, status)
    return t


def _exports_table(title: str, exports: tuple) -> Table:
    t = Table(title=f"{title} ({len(exports)})", title_justify="left", expand=False)
    t.add_column("Name", overflow="fold")
    t.add_column("Kind")
    t.add_column("Signature", overflow="fold")
    for e in exports:
        t.add_row(e.name, e.kind, e.signature or "")
    return t


def _render(r: Inspection, console: Console) -> None:
    console.print(_summary(r))
    if r.imports:
        console.print(_imports_table(r))
    else:
        console.print("Imports: none")
    console.print(_exports_table("Proxy-Wasm callbacks", r.callbacks))
    console.print(_exports_table("Other exports", r.other_exports))
    if r.runnable:
        console.print(Text("OK: this module can run on wasmgate.", style="bold green"))
    else:
        console.print(Text("Cannot run on wasmgate:", style="bold red"))
        for problem in r.problems:
            console.print(Text(f"  - {problem}"))


if __name__ == "__main__":
    main()


# -- run -------------------------------------------------------------------------------------


def _host_port(value: str | None) -> tuple[str, int] | None:
    if value is None:
        return None
    host, _, port = value.rpartition(":")
    if not port.isdigit():
        raise click.BadParameter(f"{value!r}: expected HOST:PORT")
    return (host or "127.0.0.1", int(port))


@main.command()
@click.option("-c", "--config", "configs", multiple=True, type=click.Path(path_type=Path),
              help="A YAML file or directory of WasmPlugin/Gateway documents (repeatable).")
@click.option("--listen", help="HOST:PORT to serve on (overrides the Gateway document).")
@click.option("--admin", help="HOST:PORT of the admin endpoint (default 127.0.0.1:9901).")
@click.option("--upstream", help="URL or HOST:PORT of a single upstream for every request.")
@click.option("--workers", default=1, show_default=True, type=click.IntRange(min=1),
              help="Worker processes.")
@click.option("--drain-seconds", default=10.0, show_default=True,
              type=click.FloatRange(min=0),
              help="On SIGTERM/SIGINT, how long in-flight requests may take to finish.")
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["debug", "info", "warning", "error"]))
@click.option("--access-log/--no-access-log", default=None,
              help="One line per request (Istio's format, to stdout), or none; default: as the "
                   "Gateway document's spec.accessLog says.")
@click.option("--access-log-format", metavar="FORMAT",
              help="An Envoy access log format, e.g. '%START_TIME% %RESPONSE_CODE% "
                   "%FILTER_STATE(wasm.ai_log:PLAIN)%' (implies --access-log).")
@click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path),
              envvar="WASMGATE_CACHE_DIR", help="Module cache (default ~/.cache/wasmgate).")
@click.option("--ca-file", type=click.Path(exists=True, dir_okay=False),
              envvar="WASMGATE_CA_FILE", help="CA bundle trusted for registries and http(s).")
def run(configs: tuple[Path, ...], listen: str | None, admin: str | None,
        upstream: str | None, workers: int, drain_seconds: float, log_level: str,
        access_log: bool | None, access_log_format: str | None, cache_dir: Path | None,
        ca_file: str | None) -> None:
    """Run the gateway: plugins from the WasmPlugin resources, in front of the upstreams."""
    from .gateway.runner import run_gateway

    if access_log is False and access_log_format:
        raise click.UsageError("--access-log-format and --no-access-log contradict each other")

    raise SystemExit(run_gateway(list(configs), listen=_host_port(listen),
                                 admin=_host_port(admin), upstream=upstream, workers=workers,
                                 drain_seconds=drain_seconds, log_level=log_level,
                                 access_log=access_log,
                                 access_log_format=access_log_format,
                                 cache_dir=cache_dir, ca_file=ca_file))


@main.command()
@click.option("--listen", default="127.0.0.1:8080", show_default=True)
@click.option("--admin", default="127.0.0.1:9901", show_default=True)
def demo(listen: str, admin: str) -> None:
    """Start the gateway with the bundled example plugin in front of a built-in upstream."""
    import asyncio

    from .gateway.demo import run_demo
    from .gateway.runner import _event_loop_policy, setup_logging

    setup_logging("info")
    _event_loop_policy()
    try:
        asyncio.run(run_demo(listen, admin))
    except OSError as exc:
        _fail(f"cannot start the demo gateway: {exc} (try --listen/--admin other ports)")
    except KeyboardInterrupt:
        pass


from .fetch.image_cli import image as _image  # noqa: E402  (subcommand group)

main.add_command(_image)

from .fetch.cli import register as _register_fetch  # noqa: E402  (pull, cache)

_register_fetch(main)


# -- validate --------------------------------------------------------------------------------


@main.command()
@click.option("-c", "--config", "configs", multiple=True, required=True,
              type=click.Path(path_type=Path),
              help="A YAML file or directory of WasmPlugin/Gateway documents (repeatable).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def validate(configs: tuple[Path, ...], as_json: bool) -> None:
    """Check the configuration as `run` would load it and show the plugin chain it gives,
    without fetching or starting anything (Envoy's --mode validate). Exit 2 on any error,
    including a WasmPlugin that `run` would leave out; documents of other APIs are listed
    as skipped."""
    import json

    from .api.gateway import Gateway, GatewayMeta
    from .api.loading import load_paths
    from .api.ordering import select_for_gateway, why_not_selected

    result = load_paths(list(configs))
    ours = (None, "WasmPlugin", "Gateway")
    errors = [str(e) for e in result.errors if e.kind in ours]
    skipped = [str(e) for e in result.errors if e.kind not in ours]
    if skipped and not (result.plugins or result.gateways):  # (run refuses that too)
        errors, skipped = errors + skipped, []
        errors.append("no WasmPlugin or Gateway document in the configuration")
    gateway = result.gateway or Gateway(metadata=GatewayMeta(name="default"))
    chain = select_for_gateway(result.plugins, gateway)
    spec = gateway.spec
    report = {
        "gateway": gateway.name, "listen": f"{spec.listen.host}:{spec.listen.port}",
        "labels": gateway.workload_labels, "namespace": spec.namespace,
        "routes": [{"name": r.name, "prefix": r.match.prefix, "cluster": r.cluster}
                   for r in spec.routes],
        "access_log": spec.access_log.path if spec.access_log else None,
        "chain": [{"name": p.filter_name, "phase": p.spec.phase.value,
                   "priority": p.spec.priority, "failStrategy": p.spec.fail_strategy.value,
                   "url": p.spec.url} for p in chain],
        "not_selected": sorted(p.filter_name for p in result.plugins if p not in chain),
        "why_not_selected": {p.filter_name: why_not_selected(p, gateway)
                             for p in result.plugins if p not in chain},
        "skipped": skipped, "errors": errors}
    if any(e.kind in (None, "Gateway") for e in result.errors):
        # The chain depends on the Gateway document (its labels, namespace, port): none to show.
        report.update(gateway=None, listen=None, labels=None, namespace=None, routes=[],
                      access_log=None, chain=[], not_selected=[], why_not_selected={})
    if as_json:
        click.echo(json.dumps(report, indent=2))
    elif report["gateway"] is None:
        click.echo("no chain: the Gateway document has errors")
        for item in errors:
            click.echo(f"  {item}")
    else:
        click.echo(f"gateway {report['gateway']}: listen {report['listen']}, "
                   f"{len(spec.clusters)} cluster(s), {len(spec.routes)} route(s), access log "
                   f"{report['access_log'] or 'off'}")
        click.echo(f"chain (Istio order) for labels {report['labels']} in namespace "
                   f"{report['namespace']}:")
        for i, p in enumerate(report["chain"], 1):  # type: ignore[arg-type]
            priority = "-" if p["priority"] is None else p["priority"]
            click.echo(f"  {i}. {p['name']}  {p['phase']}  priority {priority}  "
                       f"{p['failStrategy']}  {p['url']}")
        if not chain:
            click.echo("  (no plugin)")
        why = report["why_not_selected"]
        for title, items in (("not selected", [f"{n}: {why[n]}"  # type: ignore[index]
                                               for n in report["not_selected"]]),  # type: ignore
                             ("skipped", skipped), ("errors", errors)):
            if items:
                click.echo(f"{title}:")
                for item in items:  # type: ignore[attr-defined]
                    click.echo(f"  {item}")
    raise SystemExit(2 if errors else 0)
