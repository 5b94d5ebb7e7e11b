;; memory_bomb.wat -- tests: linear-memory limits. proxy_on_request_headers calls
;; memory.grow 1 page in a loop until it fails, writes to the last page, logs
;; "memory_bomb max pages=<pages>" (INFO) and returns 0. A host with a memory
;; limit (e.g. 1 GiB like proxy-wasm-cpp-host) must make grow fail at the limit.
;; See memory_bomb_vm_start.wat for the variant that grows in proxy_on_vm_start.
(module
  (import "env" "proxy_log" (func $log (param i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 0) "memory_bomb max pages=")  ;; 0, 22
  (func (export "proxy_abi_version_0_2_0"))
  ;; Minimal bump allocator (grows memory when needed, 0 on failure).
  (global $heap (mut i32) (i32.const 4096))
  (func (export "proxy_on_memory_allocate") (param $n i32) (result i32)
    (local $p i32) (local $end i32) (local $have i32)
    (local.set $p (global.get $heap))
    (local.set $end (i32.and (i32.add (i32.add (local.get $p) (local.get $n)) (i32.const 7)) (i32.const -8)))
    (local.set $have (i32.mul (memory.size) (i32.const 65536)))
    (if (i32.gt_u (local.get $end) (local.get $have))
      (then
        (if (i32.eq (memory.grow (i32.add (i32.shr_u (i32.sub (local.get $end) (local.get $have)) (i32.const 16)) (i32.const 1)))
                    (i32.const -1))
          (then (return (i32.const 0))))))
    (global.set $heap (local.get $end))
    (local.get $p))
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
  (func (export "proxy_on_configure") (param i32 i32) (result i32) (i32.const 1))
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
    (local $pages i32)
    ;; grow one page at a time until memory.grow fails (-1)
    (block $done (loop $grow
      (br_if $done (i32.eq (memory.grow (i32.const 1)) (i32.const -1)))
      (br $grow)))
    (local.set $pages (memory.size))
    ;; touch the last page
    (i32.store (i32.sub (i32.shl (local.get $pages) (i32.const 16)) (i32.const 4)) (i32.const 0xdeadbeef))
    (call $log_num (i32.const 0) (i32.const 22) (local.get $pages))
    (i32.const 0))
)
