;; abi_0_1_0.wat -- tests: ABI 0.1.0 support (export proxy_abi_version_0_1_0).
;;  * imports the 0.1.0-only host functions proxy_get_configuration(ret_ptr*,ret_len*),
;;    proxy_continue_request(), proxy_continue_response(), proxy_clear_route_cache()
;;    (all "-> i32" as registered by proxy-wasm-cpp-host);
;;  * 2-argument header callbacks proxy_on_request_headers(ctx, num_headers) and
;;    proxy_on_response_headers(ctx, num_headers).
;; Logs (INFO):
;;  on_configure:        "get_configuration status=<s>", then "configuration=<config text>"
;;  on_request_headers:  "request_headers n=<n>", "continue_request status=<s>"
;;  on_response_headers: "response_headers n=<n>", "continue_response status=<s>",
;;                       "clear_route_cache status=<s>"
;; All header callbacks return 0 (Continue); on_configure returns 1.
(module
  (import "env" "proxy_log" (func $log (param i32 i32 i32) (result i32)))
  (import "env" "proxy_get_configuration" (func $get_configuration (param i32 i32) (result i32)))
  (import "env" "proxy_continue_request" (func $continue_request (result i32)))
  (import "env" "proxy_continue_response" (func $continue_response (result i32)))
  (import "env" "proxy_clear_route_cache" (func $clear_route_cache (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 0) "get_configuration status=")    ;; 0, 25
  (data (i32.const 32) "configuration=")              ;; 32, 14
  (data (i32.const 64) "request_headers n=")          ;; 64, 18
  (data (i32.const 96) "continue_request status=")    ;; 96, 24
  (data (i32.const 128) "response_headers n=")        ;; 128, 19
  (data (i32.const 160) "continue_response status=")  ;; 160, 25
  (data (i32.const 192) "clear_route_cache status=")  ;; 192, 25
  ;; out slots: 256 = ret_ptr, 260 = ret_len
  (func (export "proxy_abi_version_0_1_0"))
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
  (func (export "proxy_on_configure") (param $root i32) (param $size i32) (result i32)
    (local $st i32) (local $p i32) (local $l i32) (local $i i32)
    (i32.store (i32.const 256) (i32.const 0))
    (i32.store (i32.const 260) (i32.const 0))
    (local.set $st (call $get_configuration (i32.const 256) (i32.const 260)))
    (call $log_num (i32.const 0) (i32.const 25) (local.get $st))
    (local.set $p (i32.load (i32.const 256)))
    (local.set $l (i32.load (i32.const 260)))
    ;; build "configuration=<text>" in the scratch area at 2048 (text truncated to 2000 bytes)
    (if (i32.gt_u (local.get $l) (i32.const 2000)) (then (local.set $l (i32.const 2000))))
    (block $b (loop $c
      (br_if $b (i32.ge_u (local.get $i) (i32.const 14)))
      (i32.store8 (i32.add (i32.const 2048) (local.get $i)) (i32.load8_u (i32.add (i32.const 32) (local.get $i))))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br $c)))
    (local.set $i (i32.const 0))
    (block $b (loop $c
      (br_if $b (i32.ge_u (local.get $i) (local.get $l)))
      (i32.store8 (i32.add (i32.const 2062) (local.get $i)) (i32.load8_u (i32.add (local.get $p) (local.get $i))))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br $c)))
    (drop (call $log (i32.const 2) (i32.const 2048) (i32.add (i32.const 14) (local.get $l))))
    (i32.const 1))
  (func (export "proxy_on_request_headers") (param $ctx i32) (param $n i32) (result i32)
    (call $log_num (i32.const 64) (i32.const 18) (local.get $n))
    (call $log_num (i32.const 96) (i32.const 24) (call $continue_request))
    (i32.const 0))
  (func (export "proxy_on_response_headers") (param $ctx i32) (param $n i32) (result i32)
    (call $log_num (i32.const 128) (i32.const 19) (local.get $n))
    (call $log_num (i32.const 160) (i32.const 25) (call $continue_response))
    (call $log_num (i32.const 192) (i32.const 25) (call $clear_route_cache))
    (i32.const 0))
)
