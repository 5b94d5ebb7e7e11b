"""Plugin-author test tools: the in-memory Emulator and its pytest fixture."""

from ..runtime.abi import Action, LogLevel
from .emulator import EmulatedStream, Emulator, EmulatorError, LogRecord

__all__ = ["Action", "EmulatedStream", "Emulator", "EmulatorError", "LogLevel", "LogRecord"]
