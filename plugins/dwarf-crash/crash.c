/*
 * dwarf-crash: a minimal Proxy-Wasm plugin (ABI 0.2.0) built with DWARF.
 *
 * proxy_on_request_headers walks handle_request -> parse_header ->
 * check_bounds, and check_bounds traps. wasmgate's tests use the trap
 * frames to check that module offsets map back to this file and line.
 */
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>

#define EXPORT(name) __attribute__((export_name(#name)))
#define NOINLINE __attribute__((noinline))

EXPORT(proxy_abi_version_0_2_0) void proxy_abi_version_0_2_0(void) {}

EXPORT(proxy_on_memory_allocate) void *proxy_on_memory_allocate(size_t size) {
  return malloc(size);
}

EXPORT(proxy_on_context_create) void proxy_on_context_create(uint32_t ctx, uint32_t parent) {
  (void)ctx;
  (void)parent;
}

EXPORT(proxy_on_vm_start) uint32_t proxy_on_vm_start(uint32_t ctx, uint32_t size) {
  (void)ctx;
  (void)size;
  return 1;
}

EXPORT(proxy_on_configure) uint32_t proxy_on_configure(uint32_t ctx, uint32_t size) {
  (void)ctx;
  (void)size;
  return 1;
}

/* Written before trapping so that the trap is not merely the target of the
 * branch: Cranelift folds `br_if; unreachable` into a conditional trap that
 * wasmtime attributes to the br_if (the `if` line) rather than to the trap. */
static volatile uint32_t last_bad_headers;

static NOINLINE uint32_t check_bounds(uint32_t headers) {
  if (headers < 1000000) {
    last_bad_headers = headers;
    __builtin_trap(); // TRAP LINE
  }
  return headers;
}

static NOINLINE uint32_t parse_header(uint32_t headers) {
  uint32_t checked = check_bounds(headers + 1);
  return checked * 2;
}

static NOINLINE uint32_t handle_request(uint32_t ctx, uint32_t headers) {
  uint32_t parsed = parse_header(headers);
  return parsed + ctx;
}

EXPORT(proxy_on_request_headers)
uint32_t proxy_on_request_headers(uint32_t ctx, uint32_t headers, uint32_t end_of_stream) {
  (void)end_of_stream;
  return handle_request(ctx, headers) == 0 ? 0 : 1;
}
