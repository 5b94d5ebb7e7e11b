"""`wasmgate pull` and `wasmgate cache ls|prune`: click commands the main group attaches
(`register(main)`), each usable on its own too."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import unquote, urlsplit

import click
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from .cache import ModuleCache
from .http import Progress as ProgressCallback
from .http import parse_duration, redact_url

EXIT_FETCH_FAILED, EXIT_BAD_INPUT = 1, 2
PROGRESS_THRESHOLD = 1 << 20
"""Downloads smaller than this (when their size is known) get no progress bar."""

_cache_dir = click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path),
                          envvar="WASMGATE_CACHE_DIR",
                          help="Cache directory [default: ~/.cache/wasmgate].")


def register(group: click.Group) -> None:
    group.add_command(pull)
    group.add_command(cache)


def _fail(message: str, code: int = EXIT_BAD_INPUT) -> None:
    click.echo(f"wasmgate: error: {message}", err=True)
    raise SystemExit(code)


def resolve_ref(ref: str) -> str:
    """A url as given; an existing path; else an image reference (oci:// added)."""
    if "://" in ref or Path(ref).exists():
        return ref
    from ..api import urls

    try:
        urls.check_url(ref)
    except ValueError as exc:
        _fail(f"{ref}: {exc}")
    return urls.resolve_url(ref)


# -- pull --------------------------------------------------------------------------------------


@click.command()
@click.argument("ref")
@_cache_dir
@click.option("--insecure", is_flag=True, default=None,
              help="Skip TLS verification (else per WASM_INSECURE_REGISTRIES).")
@click.option("--ca-file", type=click.Path(dir_okay=False, exists=True),
              help="Also trust the CA certificates in this PEM bundle.")
@click.option("--pull-secret", type=click.Path(exists=True),
              help="Docker config JSON, or a directory holding .dockerconfigjson.")
@click.option("--sha256", "sha256", metavar="HEX", help="Expected checksum (file hash for "
              "http, manifest digest for OCI); a cached module with it is used.")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
              help="Also write the module to this file.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def pull(ref: str, cache_dir: Path | None, insecure: bool | None, ca_file: str | None,
         pull_secret: str | None, sha256: str | None, output: Path | None, quiet: bool) -> None:
    """Fetch a module (http(s) url, oci:// or image reference) into the cache.

    Always asks the source again (an OCI tag is re-resolved), unless --sha256 names a module
    already cached.
    """
    from .errors import FetchError
    from .fetcher import ModuleFetcher

    url = resolve_ref(ref)
    fetcher = ModuleFetcher(ModuleCache(cache_dir))
    console = Console(stderr=True, highlight=False)
    started = time.monotonic()
    try:
        with _progress(console, redact_url(url), quiet) as progress:
            result = fetcher.fetch(url, sha256=sha256, pull_policy="Always",
                                   pull_secret=pull_secret, insecure=insecure, ca_file=ca_file,
                                   progress=progress, force=True)
    except FetchError as exc:
        _fail(str(exc), EXIT_FETCH_FAILED)
    if output is not None:
        output.write_bytes(result.wasm)
    elapsed = time.monotonic() - started
    if result.source == "file":  # local modules are read where they are, never cached
        where = Path(unquote(urlsplit(url).path))
        verb = "read"
    else:
        where = fetcher.cache.module_path(result.module_sha256)
        verb = "cached" if result.source == "cache" else "pulled"
    click.echo(f"{verb} {redact_url(url)} ({_size(len(result.wasm))}, {elapsed:.2f}s)")
    click.echo(f"  module sha256: {result.module_sha256}")
    if result.checksum != result.module_sha256:
        click.echo(f"  manifest:      sha256:{result.checksum}")
    click.echo(f"  path:          {output or where}")


@contextmanager
def _progress(console: Console, label: str, quiet: bool) -> Iterator[ProgressCallback | None]:
    if quiet:
        yield None
        return
    bar = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(binary_units=True),
                   TransferSpeedColumn(), TimeRemainingColumn(), console=console, transient=True)
    task: list[TaskID] = []

    def update(done: int, total: int | None) -> None:
        if not task:
            if total is not None and total < PROGRESS_THRESHOLD:
                return
            bar.start()
            task.append(bar.add_task(label, total=total))
        bar.update(task[0], completed=done, total=total)

    try:
        yield update
    finally:
        if task:
            bar.stop()


# -- cache -------------------------------------------------------------------------------------


@click.group()
def cache() -> None:
    """Inspect and prune the module cache."""


@cache.command("ls")
@_cache_dir
@click.option("--json", "as_json", is_flag=True, help="Print the index as JSON.")
def cache_ls(cache_dir: Path | None, as_json: bool) -> None:
    """List cached modules: url, checksum, size, last use and the resources using each."""
    store = ModuleCache(cache_dir)
    entries = store.entries()
    if as_json:
        click.echo(json.dumps({e.url: e.to_json() for e in entries}, indent=2))
        return
    if not entries:
        click.echo(f"the module cache is empty ({store.root})")
        return
    width = None if sys.stdout.isatty() else 160
    console = Console(highlight=False, width=width)
    table = Table(title=str(store.root), title_justify="left")
    for column in ("url", "checksum", "size", "last used", "revisions"):
        table.add_column(column, overflow="fold", no_wrap=column != "url")
    now = time.time()
    for e in entries:
        cached = "" if store.module_path(e.module_sha256).is_file() else " (file missing)"
        revisions = ", ".join(f"{k or '-'}={v or '-'}" for k, v in sorted(e.revisions.items()))
        table.add_row(e.url, e.checksum[:12] + cached, _size(e.size), _ago(now - e.last_used),
                      revisions)
    console.print(table)


@cache.command("prune")
@_cache_dir
@click.option("--older-than", metavar="DURATION", default=None,
              help="Forget modules unused for this long (e.g. 90m, 24h) "
                   "[default: WASM_MODULE_EXPIRY or 24h].")
@click.option("--all", "everything", is_flag=True, help="Empty the cache.")
def cache_prune(cache_dir: Path | None, older_than: str | None, everything: bool) -> None:
    """Delete modules not used recently (and their compiled code)."""
    try:
        age = parse_duration(older_than) if older_than else None
    except ValueError as exc:
        _fail(str(exc))
    store = ModuleCache(cache_dir)
    removed = store.purge(older_than=age, everything=everything)
    left = len(store.entries())
    click.echo(f"removed {len(removed)} module{'s' if len(removed) != 1 else ''}; "
               f"{left} url{'s' if left != 1 else ''} remain{'s' if left == 1 else ''} cached")


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB"):
        if value < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


def _ago(seconds: float) -> str:
    if seconds < 60:
        return "just now"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit} ago"
    return "just now"
