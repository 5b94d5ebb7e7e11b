"""Plugin-author test tools: the in-memory Emulator and its pytest fixture."""
