"""Exception families of the runtime: one base, one subclass per outcome a caller acts on."""

from __future__ import annotations

from dataclasses import dataclass, field


class RuntimeFailure(Exception):
    """Base of every error the runtime raises."""


class ModuleLoadError(RuntimeFailure):
    """The bytes are not a module we can run (corrupt, no ABI, unsatisfiable import)."""


class UnsupportedAbi(ModuleLoadError):
    """No (or an unknown) `proxy_abi_version_*` export."""


class MissingImport(ModuleLoadError):
    """The module imports a function we do not provide, or with another signature."""

    def __init__(self, module: str, name: str, detail: str = "") -> None:
        self.module, self.name = module, name
        what = f"import {module}.{name} cannot be satisfied"
        super().__init__(f"{what}: {detail}" if detail else what)


@dataclass(frozen=True)
class Frame:
    """One frame of an in-VM backtrace (innermost first)."""

    func_index: int
    func_name: str | None
    module_offset: int | None
    source: str | None = None  # "file:line" when the module carries DWARF


@dataclass
class TrapInfo:
    """What went wrong inside the VM, in the shape Envoy logs it."""

    function: str
    message: str
    trap_code: str | None = None
    frames: list[Frame] = field(default_factory=list)
    host_exception: BaseException | None = None

    def fail_message(self) -> str:
        """`Function: <export> failed: <msg>` then the backtrace, as Envoy's V8 backend prints."""
        lines = [f"Function: {self.function} failed: {self.message}"]
        if self.frames:
            lines.append("Proxy-Wasm plugin in-VM backtrace:")
            for i, frame in enumerate(self.frames):
                name = frame.func_name or f"unknown(function index:{frame.func_index})"
                offset = f"0x{frame.module_offset:x}" if frame.module_offset is not None else "?"
                line = f"{i:>3}:  {offset} - {name}"
                if frame.source:
                    line += f" at {frame.source}"
                lines.append(line)
        return "\n".join(lines)


class PluginTrap(RuntimeFailure):
    """A trap (or a host-side exception turned into one) ended a guest call."""

    def __init__(self, info: TrapInfo) -> None:
        self.info = info
        super().__init__(info.fail_message())


class PluginFailed(RuntimeFailure):
    """The plugin is in a failed state and cannot run callbacks until it is rebuilt."""


class PluginStartError(RuntimeFailure):
    """The VM could not start: initialisation trapped or on_vm_start returned false."""


class ConfigurationRejected(RuntimeFailure):
    """on_configure returned false: the plugin refused its configuration."""
