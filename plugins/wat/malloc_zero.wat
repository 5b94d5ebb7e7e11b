;; malloc_zero.wat -- tests: the guest allocator failing. proxy_on_memory_allocate
;; always returns 0. on_configure asks for the plugin configuration with
;; proxy_get_buffer_bytes(7, 0, size, ret_ptr*, ret_len*) and logs
;; "get_buffer_bytes status=<s>" (INFO); it returns 1. A non-empty config cannot
;; be delivered, so the host must return an error status (CH: INVALID_MEMORY_ACCESS=6)
;; instead of writing to address 0 or trapping.
(module
  (import "env" "proxy_log" (func $log (param i32 i32 i32) (result i32)))
  (import "env" "proxy_get_buffer_bytes" (func $gbb (param i32 i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 0) "get_buffer_bytes status=")  ;; 0, 24
  (func (export "proxy_abi_version_0_2_0"))
  (func (export "proxy_on_memory_allocate") (param i32) (result i32) (i32.const 0))
  ;; $log_num(prefix_ptr, prefix_len, n): logs "<prefix><n as signed decimal>" at INFO.
  ;; Scratch area 1024..1112.
  (func $log_num (param $p i32) (param $l i32) (param $n i32)
    (local $d i32) (local $t i32) (local $u i32)
    (block $b (loop $c
      (br_if $b (i32.ge_u (local.get $d) (local.get $l)))
      (i32.store8 (i32.add (i32.const 1024) (local.get $d)) (i32.load8_u (i32.add (local.get $p) (local.get $d))))
      (local.set $d (i32.add (local.get $d) (i32.const 1)))
      (br $c)))
    (local.set $u (local.get $n))
    (if (i32.lt_s (local.get $n) (i32.const 0))
      (then
        (i32.store8 (i32.add (i32.const 1024) (local.get $d)) (i32.const 45))
        (local.set $d (i32.add (local.get $d) (i32.const 1)))
        (local.set $u (i32.sub (i32.const 0) (local.get $n)))))
    (local.set $t (i32.const 1112))
    (loop $c
      (local.set $t (i32.sub (local.get $t) (i32.const 1)))
      (i32.store8 (local.get $t) (i32.add (i32.const 48) (i32.rem_u (local.get $u) (i32.const 10))))
      (local.set $u (i32.div_u (local.get $u) (i32.const 10)))
      (br_if $c (local.get $u)))
    (block $b (loop $c
      (br_if $b (i32.ge_u (local.get $t) (i32.const 1112)))
      (i32.store8 (i32.add (i32.const 1024) (local.get $d)) (i32.load8_u (local.get $t)))
      (local.set $d (i32.add (local.get $d) (i32.const 1)))
      (local.set $t (i32.add (local.get $t) (i32.const 1)))
      (br $c)))
    (drop (call $log (i32.const 2) (i32.const 1024) (local.get $d))))
  ;; Root-context boilerplate: context_create is a no-op, vm_start/configure succeed.
  (func (export "proxy_on_context_create") (param i32 i32))
  (func (export "proxy_on_vm_start") (param i32 i32) (result i32) (i32.const 1))
  (func (export "proxy_on_configure") (param $root i32) (param $size i32) (result i32)
    (call $log_num (i32.const 0) (i32.const 24)
      (call $gbb (i32.const 7) (i32.const 0) (local.get $size) (i32.const 256) (i32.const 260)))
    (i32.const 1))
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32) (i32.const 0))
)
