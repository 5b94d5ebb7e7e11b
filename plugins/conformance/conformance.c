/*
 * wasmgate conformance plugin: a Proxy-Wasm (ABI 0.2.1 + Higress extras)
 * module that a test suite drives entirely through its configuration.
 *
 * The configuration is a list of steps `<callback> <op> [args...]`; see
 * README.md in this directory for the full protocol. Every callback logs
 * `enter <callback> <args...>` and every op logs `conf <callback> <op> ...`.
 *
 * Build (wasi-libc reactor): see build.sh.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <wasi/api.h>

typedef int32_t i32;
typedef int64_t i64;
typedef uint32_t u32;
typedef uint64_t u64;

#define EXPORT(n) __attribute__((export_name(n)))
#define IMPORT(n) __attribute__((import_module("env"), import_name(#n)))

/* ------------------------------------------------------------------ */
/* host functions (module env), all return i32 status                  */
/* ------------------------------------------------------------------ */
IMPORT(proxy_log) i32 proxy_log(i32, i32, i32);
IMPORT(proxy_get_log_level) i32 proxy_get_log_level(i32);
IMPORT(proxy_get_current_time_nanoseconds) i32 proxy_get_current_time_nanoseconds(i32);
IMPORT(proxy_set_tick_period_milliseconds) i32 proxy_set_tick_period_milliseconds(i32);
IMPORT(proxy_get_buffer_bytes) i32 proxy_get_buffer_bytes(i32, i32, i32, i32, i32);
IMPORT(proxy_set_buffer_bytes) i32 proxy_set_buffer_bytes(i32, i32, i32, i32, i32);
IMPORT(proxy_get_buffer_status) i32 proxy_get_buffer_status(i32, i32, i32);
IMPORT(proxy_get_header_map_size) i32 proxy_get_header_map_size(i32, i32);
IMPORT(proxy_get_header_map_pairs) i32 proxy_get_header_map_pairs(i32, i32, i32);
IMPORT(proxy_set_header_map_pairs) i32 proxy_set_header_map_pairs(i32, i32, i32);
IMPORT(proxy_get_header_map_value) i32 proxy_get_header_map_value(i32, i32, i32, i32, i32);
IMPORT(proxy_add_header_map_value) i32 proxy_add_header_map_value(i32, i32, i32, i32, i32);
IMPORT(proxy_replace_header_map_value) i32 proxy_replace_header_map_value(i32, i32, i32, i32, i32);
IMPORT(proxy_remove_header_map_value) i32 proxy_remove_header_map_value(i32, i32, i32);
IMPORT(proxy_continue_stream) i32 proxy_continue_stream(i32);
IMPORT(proxy_close_stream) i32 proxy_close_stream(i32);
IMPORT(proxy_send_local_response) i32 proxy_send_local_response(i32, i32, i32, i32, i32, i32, i32, i32);
IMPORT(proxy_get_status) i32 proxy_get_status(i32, i32, i32);
IMPORT(proxy_http_call) i32 proxy_http_call(i32, i32, i32, i32, i32, i32, i32, i32, i32, i32);
IMPORT(proxy_grpc_call) i32 proxy_grpc_call(i32, i32, i32, i32, i32, i32, i32, i32, i32, i32, i32, i32);
IMPORT(proxy_grpc_stream) i32 proxy_grpc_stream(i32, i32, i32, i32, i32, i32, i32, i32, i32);
IMPORT(proxy_grpc_send) i32 proxy_grpc_send(i32, i32, i32, i32);
IMPORT(proxy_grpc_cancel) i32 proxy_grpc_cancel(i32);
IMPORT(proxy_grpc_close) i32 proxy_grpc_close(i32);
IMPORT(proxy_set_shared_data) i32 proxy_set_shared_data(i32, i32, i32, i32, i32);
IMPORT(proxy_get_shared_data) i32 proxy_get_shared_data(i32, i32, i32, i32, i32);
IMPORT(proxy_register_shared_queue) i32 proxy_register_shared_queue(i32, i32, i32);
IMPORT(proxy_resolve_shared_queue) i32 proxy_resolve_shared_queue(i32, i32, i32, i32, i32);
IMPORT(proxy_enqueue_shared_queue) i32 proxy_enqueue_shared_queue(i32, i32, i32);
IMPORT(proxy_dequeue_shared_queue) i32 proxy_dequeue_shared_queue(i32, i32, i32);
IMPORT(proxy_define_metric) i32 proxy_define_metric(i32, i32, i32, i32);
IMPORT(proxy_increment_metric) i32 proxy_increment_metric(i32, i64);
IMPORT(proxy_record_metric) i32 proxy_record_metric(i32, i64);
IMPORT(proxy_get_metric) i32 proxy_get_metric(i32, i32);
IMPORT(proxy_get_property) i32 proxy_get_property(i32, i32, i32, i32);
IMPORT(proxy_set_property) i32 proxy_set_property(i32, i32, i32, i32);
IMPORT(proxy_set_effective_context) i32 proxy_set_effective_context(i32);
IMPORT(proxy_done) i32 proxy_done(void);
IMPORT(proxy_call_foreign_function) i32 proxy_call_foreign_function(i32, i32, i32, i32, i32, i32);
/* Higress (ABI 0.2.100 extras, also registered for 0.2.1 by Higress' host) */
IMPORT(proxy_redis_init) i32 proxy_redis_init(i32, i32, i32, i32, i32, i32, i32);
IMPORT(proxy_redis_call) i32 proxy_redis_call(i32, i32, i32, i32, i32);
IMPORT(proxy_inject_encoded_data_to_filter_chain) i32 proxy_inject_encoded_data_to_filter_chain(i32, i32, i32);
IMPORT(proxy_get_upstream_hosts) i32 proxy_get_upstream_hosts(i32, i32);
IMPORT(proxy_set_upstream_override_host) i32 proxy_set_upstream_override_host(i32, i32);

/* proc_exit declared without _Noreturn so a host that returns (like
 * proxy-wasm-cpp-host) lets us continue and log that it returned. */
__attribute__((import_module("wasi_snapshot_preview1"), import_name("proc_exit")))
void wasi_proc_exit_may_return(i32 code);

/* ------------------------------------------------------------------ */
/* small string builder + logging                                      */
/* ------------------------------------------------------------------ */
typedef struct { char *p; size_t n, cap; } sb_t;

static void sb_reserve(sb_t *b, size_t extra) {
  if (b->n + extra + 1 <= b->cap) return;
  size_t nc = b->cap ? b->cap : 128;
  while (nc < b->n + extra + 1) nc *= 2;
  char *np = realloc(b->p, nc);
  if (!np) __builtin_trap();
  b->p = np;
  b->cap = nc;
}
static void sb_mem(sb_t *b, const void *s, size_t n) {
  sb_reserve(b, n);
  memcpy(b->p + b->n, s, n);
  b->n += n;
  b->p[b->n] = 0;
}
static void sb_str(sb_t *b, const char *s) { sb_mem(b, s, strlen(s)); }
static void sb_u64(sb_t *b, u64 v) {
  char t[24];
  int i = 24;
  do { t[--i] = (char)('0' + v % 10); v /= 10; } while (v);
  sb_mem(b, t + i, 24 - i);
}
static void sb_i64(sb_t *b, i64 v) {
  if (v < 0) { sb_str(b, "-"); sb_u64(b, (u64)0 - (u64)v); }
  else sb_u64(b, (u64)v);
}
static const char HEX[] = "0123456789ABCDEF";
static int plain_byte(unsigned char c) {
  return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') ||
         c == '.' || c == '_' || c == '~' || c == '/' || c == ':' || c == '-';
}
static void sb_escaped(sb_t *b, const unsigned char *s, size_t n) {
  sb_reserve(b, n * 3);
  for (size_t i = 0; i < n; i++) {
    unsigned char c = s[i];
    if (plain_byte(c)) b->p[b->n++] = (char)c;
    else { b->p[b->n++] = '%'; b->p[b->n++] = HEX[c >> 4]; b->p[b->n++] = HEX[c & 15]; }
  }
  b->p[b->n] = 0;
}
static void sb_free(sb_t *b) { free(b->p); b->p = 0; b->n = b->cap = 0; }

static void log_at(int level, sb_t *b) {
  proxy_log(level, (i32)(uintptr_t)b->p, (i32)b->n);
  sb_free(b);
}

static size_t mem_size(void) { return __builtin_wasm_memory_size(0) * 65536ul; }
static int in_memory(u32 ptr, u32 len) { return (u64)ptr + (u64)len <= (u64)mem_size(); }

/* ------------------------------------------------------------------ */
/* callbacks                                                           */
/* ------------------------------------------------------------------ */
enum { K_VOID, K_BOOL, K_ACTION };
#define CALLBACKS(X)                                                     \
  X(context_create, K_VOID) X(vm_start, K_BOOL) X(configure, K_BOOL)     \
  X(validate_configuration, K_BOOL) X(tick, K_VOID)                      \
  X(queue_ready, K_VOID) X(foreign_function, K_VOID)                     \
  X(request_headers, K_ACTION) X(request_body, K_ACTION)                 \
  X(request_trailers, K_ACTION) X(response_headers, K_ACTION)            \
  X(response_body, K_ACTION) X(response_trailers, K_ACTION)              \
  X(log, K_VOID) X(done, K_BOOL) X(delete, K_VOID)                       \
  X(http_call_response, K_VOID) X(grpc_receive_initial_metadata, K_VOID) \
  X(grpc_receive, K_VOID) X(grpc_receive_trailing_metadata, K_VOID)      \
  X(grpc_close, K_VOID) X(redis_call_response, K_VOID)                   \
  X(new_connection, K_ACTION) X(downstream_data, K_ACTION)               \
  X(upstream_data, K_ACTION) X(downstream_connection_close, K_VOID)      \
  X(upstream_connection_close, K_VOID)

#define CB_ENUM(n, k) CB_##n,
enum { CALLBACKS(CB_ENUM) CB_COUNT };
#define CB_NAME(n, k) #n,
static const char *const cb_names[] = {CALLBACKS(CB_NAME)};
#define CB_KIND(n, k) k,
static const unsigned char cb_kinds[] = {CALLBACKS(CB_KIND)};

/* callbacks whose first argument is a root context id */
static int cb_is_root(int cb) {
  switch (cb) {
    case CB_vm_start: case CB_configure: case CB_validate_configuration:
    case CB_tick: case CB_queue_ready: case CB_foreign_function:
    case CB_http_call_response: case CB_grpc_receive_initial_metadata:
    case CB_grpc_receive: case CB_grpc_receive_trailing_metadata:
    case CB_grpc_close: case CB_redis_call_response:
      return 1;
  }
  return 0;
}

/* ------------------------------------------------------------------ */
/* ops: host function table. Signature letters (params in order):      */
/*  i  i32 input         I  i64 input        b  (ptr,len) input        */
/*  u  u32 out*          U  u64 out*         B  (ret_ptr*,ret_len*)    */
/*  T  u32 token out* (recorded as $token)   M  u32 metric id out*     */
/* ------------------------------------------------------------------ */
#define OPS(X)                                                            \
  X(log, "ib") X(get_log_level, "u") X(get_current_time_nanoseconds, "U") \
  X(set_tick_period_milliseconds, "i") X(get_buffer_bytes, "iiiB")        \
  X(set_buffer_bytes, "iiib") X(get_buffer_status, "iuu")                 \
  X(get_header_map_size, "iu") X(get_header_map_pairs, "iB")              \
  X(set_header_map_pairs, "ib") X(get_header_map_value, "ibB")            \
  X(add_header_map_value, "ibb") X(replace_header_map_value, "ibb")       \
  X(remove_header_map_value, "ib") X(continue_stream, "i")                \
  X(close_stream, "i") X(send_local_response, "ibbbi")                    \
  X(get_status, "uB") X(http_call, "bbbbiT") X(grpc_call, "bbbbbiT")      \
  X(grpc_stream, "bbbbT") X(grpc_send, "ibi") X(grpc_cancel, "i")         \
  X(grpc_close, "i") X(set_shared_data, "bbi") X(get_shared_data, "bBu")  \
  X(register_shared_queue, "bT") X(resolve_shared_queue, "bbT")           \
  X(enqueue_shared_queue, "ib") X(dequeue_shared_queue, "iB")             \
  X(define_metric, "ibM") X(increment_metric, "iI")                       \
  X(record_metric, "iI") X(get_metric, "iU") X(get_property, "bB")        \
  X(set_property, "bb") X(set_effective_context, "i") X(done, "")         \
  X(call_foreign_function, "bbB") X(redis_init, "bbbi")                   \
  X(redis_call, "bbT") X(inject_encoded_data_to_filter_chain, "bi")       \
  X(get_upstream_hosts, "B") X(set_upstream_override_host, "b")

#define OP_ENUM(n, s) OP_##n,
enum { OPS(OP_ENUM) OP_COUNT };
#define OP_NAME(n, s) #n,
static const char *const op_names[] = {OPS(OP_NAME)};
#define OP_SIG(n, s) s,
static const char *const op_sigs[] = {OPS(OP_SIG)};

/* ------------------------------------------------------------------ */
/* step storage                                                        */
/* ------------------------------------------------------------------ */
typedef struct { int cb; char *line; } step_t;
static step_t *steps;
static size_t nsteps, capsteps;

static u32 last_token, last_metric, last_root;

typedef struct { i32 ctx, root; } ctxmap_t;
static ctxmap_t *ctxs;
static size_t nctxs, capctxs;

static void ctx_set(i32 ctx, i32 root) {
  for (size_t i = 0; i < nctxs; i++)
    if (ctxs[i].ctx == ctx) { ctxs[i].root = root; return; }
  if (nctxs == capctxs) {
    capctxs = capctxs ? capctxs * 2 : 16;
    ctxs = realloc(ctxs, capctxs * sizeof *ctxs);
    if (!ctxs) __builtin_trap();
  }
  ctxs[nctxs].ctx = ctx;
  ctxs[nctxs].root = root;
  nctxs++;
}
static int ctx_get(i32 ctx, i32 *root) {
  for (size_t i = 0; i < nctxs; i++)
    if (ctxs[i].ctx == ctx) { *root = ctxs[i].root; return 1; }
  return 0;
}
static void ctx_del(i32 ctx) {
  for (size_t i = 0; i < nctxs; i++)
    if (ctxs[i].ctx == ctx) { ctxs[i] = ctxs[--nctxs]; return; }
}

static int is_space(char c) { return c == ' ' || c == '\t' || c == '\r' || c == '\v' || c == '\f'; }

/* Split s (modified in place) into whitespace separated tokens. */
static int tokenize(char *s, char **tok, int max) {
  int n = 0;
  while (*s) {
    while (is_space(*s)) s++;
    if (!*s) break;
    if (n < max) tok[n++] = s;
    while (*s && !is_space(*s)) s++;
    if (*s) *s++ = 0;
  }
  return n;
}

static int find_cb(const char *name) {
  for (int i = 0; i < CB_COUNT; i++)
    if (!strcmp(cb_names[i], name)) return i;
  return -1;
}

/* Parse configuration text and append its steps. Returns #steps added. */
static int add_steps(const char *text, size_t len) {
  int added = 0;
  size_t i = 0;
  while (i < len) {
    size_t j = i;
    while (j < len && text[j] != '\n') j++;
    size_t l = j - i;
    char *line = malloc(l + 1);
    if (!line) __builtin_trap();
    memcpy(line, text + i, l);
    line[l] = 0;
    i = j + 1;
    char *hash = strchr(line, '#');
    if (hash) *hash = 0;
    /* NUL bytes in the config end the line (strchr/strlen semantics). */
    char *p = line;
    while (is_space(*p)) p++;
    if (!*p) { free(line); continue; }
    char *name = p;
    while (*p && !is_space(*p)) p++;
    if (*p) *p++ = 0;
    while (is_space(*p)) p++;
    int cb = find_cb(name);
    if (cb < 0 || !*p) {
      sb_t b = {0};
      sb_str(&b, cb < 0 ? "conf unknown callback " : "conf missing op for ");
      sb_escaped(&b, (const unsigned char *)name, strlen(name));
      log_at(4, &b);
      free(line);
      continue;
    }
    if (nsteps == capsteps) {
      capsteps = capsteps ? capsteps * 2 : 16;
      steps = realloc(steps, capsteps * sizeof *steps);
      if (!steps) __builtin_trap();
    }
    size_t rl = strlen(p);
    char *copy = malloc(rl + 1);
    if (!copy) __builtin_trap();
    memcpy(copy, p, rl + 1);
    free(line);
    steps[nsteps].cb = cb;
    steps[nsteps].line = copy;
    nsteps++;
    added++;
  }
  return added;
}

/* Decode one JSON string starting at text[*i] == '"' into b; advance *i past it. */
static int json_string(const char *text, size_t len, size_t *i, sb_t *b) {
  size_t k = *i + 1;
  while (k < len && text[k] != '"') {
    char c = text[k++];
    if (c == '\\' && k < len) {
      char e = text[k++];
      c = e == 'n' ? '\n' : e == 't' ? '\t' : e == 'r' ? '\r' : e;
      if (e == 'u' && k + 4 <= len) { c = '?'; k += 4; }
    }
    if (!c) c = '?';
    sb_mem(b, &c, 1);
  }
  if (k >= len) return 0;
  *i = k + 1;
  return 1;
}

/* Istio sends pluginConfig as JSON: {"steps": "line\nline"} or {"steps": ["line", ...]}.
   Returns the steps text (malloc'd, NUL-terminated) or NULL when `text` is not such JSON. */
static char *json_steps(const char *text, size_t len, size_t *out_len) {
  size_t i = 0;
  while (i < len && is_space(text[i])) i++;
  if (i >= len || text[i] != '{') return NULL;
  const char *key = "\"steps\"";
  size_t kl = strlen(key);
  for (; i + kl <= len; i++) if (memcmp(text + i, key, kl) == 0) break;
  if (i + kl > len) return NULL;
  i += kl;
  while (i < len && (is_space(text[i]) || text[i] == ':')) i++;
  sb_t b = {0};
  if (i < len && text[i] == '"') {
    if (!json_string(text, len, &i, &b)) return NULL;
  } else if (i < len && text[i] == '[') {
    i++;
    while (i < len && text[i] != ']') {
      if (text[i] == '"') {
        if (!json_string(text, len, &i, &b)) return NULL;
        sb_str(&b, "\n");
      } else {
        i++;
      }
    }
  } else {
    return NULL;
  }
  sb_str(&b, "");
  *out_len = b.n;
  return b.p;
}

/* Read buffer `type` (size bytes) and append the steps it contains. */
static void load_config(int cb, i32 type, i32 size) {
  if (size <= 0) return;
  u32 ptr = 0, len = 0;
  i32 st = proxy_get_buffer_bytes(type, 0, size, (i32)(uintptr_t)&ptr, (i32)(uintptr_t)&len);
  int added = 0;
  if (st == 0 && ptr && len && in_memory(ptr, len)) {
    size_t jl = 0;
    char *steps_text = json_steps((const char *)(uintptr_t)ptr, len, &jl);
    if (steps_text) {
      added = add_steps(steps_text, jl);
      free(steps_text);
    } else {
      added = add_steps((const char *)(uintptr_t)ptr, len);
    }
  }
  if (st == 0 && ptr && in_memory(ptr, len)) free((void *)(uintptr_t)ptr);
  sb_t b = {0};
  sb_str(&b, "config ");
  sb_str(&b, cb_names[cb]);
  sb_str(&b, " buffer=");
  sb_i64(&b, type);
  sb_str(&b, " status=");
  sb_i64(&b, st);
  sb_str(&b, " bytes=");
  sb_u64(&b, len);
  sb_str(&b, " steps=");
  sb_i64(&b, added);
  log_at(1, &b); /* DEBUG: keeps INFO output to enter/conf lines */
}

/* ------------------------------------------------------------------ */
/* argument tokens                                                     */
/* ------------------------------------------------------------------ */
typedef struct {
  int cb;
  i32 self, root;
  void *allocs[32];
  int nallocs;
} run_t;

static int parse_int(const char *s, i64 *out) {
  int neg = 0;
  u64 v = 0;
  if (*s == '-') { neg = 1; s++; } else if (*s == '+') s++;
  if (!*s) return 0;
  if (s[0] == '0' && (s[1] == 'x' || s[1] == 'X')) {
    s += 2;
    if (!*s) return 0;
    for (; *s; s++) {
      int d;
      if (*s >= '0' && *s <= '9') d = *s - '0';
      else if (*s >= 'a' && *s <= 'f') d = *s - 'a' + 10;
      else if (*s >= 'A' && *s <= 'F') d = *s - 'A' + 10;
      else return 0;
      v = v * 16 + (u64)d;
    }
  } else {
    for (; *s; s++) {
      if (*s < '0' || *s > '9') return 0;
      v = v * 10 + (u64)(*s - '0');
    }
  }
  *out = neg ? (i64)((u64)0 - v) : (i64)v;
  return 1;
}

static int hexval(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}
/* Percent-decode s[0..n) into dst; returns decoded length. */
static size_t pct_decode(const char *s, size_t n, unsigned char *dst) {
  size_t o = 0;
  for (size_t i = 0; i < n; i++) {
    if (s[i] == '%' && i + 2 < n && hexval(s[i + 1]) >= 0 && hexval(s[i + 2]) >= 0) {
      dst[o++] = (unsigned char)(hexval(s[i + 1]) * 16 + hexval(s[i + 2]));
      i += 2;
    } else {
      dst[o++] = (unsigned char)s[i];
    }
  }
  return o;
}

static void *run_alloc(run_t *r, size_t n) {
  void *p = malloc(n ? n : 1);
  if (!p) __builtin_trap();
  if (r->nallocs < 32) r->allocs[r->nallocs++] = p;
  return p;
}
static void run_free(run_t *r) {
  for (int i = 0; i < r->nallocs; i++) free(r->allocs[i]);
  r->nallocs = 0;
}

static void put_u32le(unsigned char *p, u32 v) {
  p[0] = (unsigned char)v; p[1] = (unsigned char)(v >> 8);
  p[2] = (unsigned char)(v >> 16); p[3] = (unsigned char)(v >> 24);
}

/* Serialize `m:k1=v1&k2=v2` into the proxy-wasm pairs format. */
static void build_map(run_t *r, const char *s, u32 *ptr, u32 *len) {
  size_t sl = strlen(s);
  size_t npairs = 0;
  if (sl) { npairs = 1; for (size_t i = 0; i < sl; i++) if (s[i] == '&') npairs++; }
  /* upper bound: 4 + 8*n + decoded bytes + 2*n */
  unsigned char *buf = run_alloc(r, 4 + 10 * npairs + sl);
  u32 *klen = (u32 *)run_alloc(r, (npairs ? npairs : 1) * 2 * sizeof(u32));
  unsigned char *tmp = run_alloc(r, sl + 1);
  unsigned char *data = run_alloc(r, 2 * npairs + sl + 1);
  size_t dn = 0, k = 0, i = 0;
  while (k < npairs) {
    size_t j = i;
    while (j < sl && s[j] != '&') j++;
    size_t eq = i;
    while (eq < j && s[eq] != '=') eq++;
    size_t kl = pct_decode(s + i, eq - i, tmp);
    memcpy(data + dn, tmp, kl); dn += kl; data[dn++] = 0;
    size_t vl = eq < j ? pct_decode(s + eq + 1, j - eq - 1, tmp) : 0;
    memcpy(data + dn, tmp, vl); dn += vl; data[dn++] = 0;
    klen[2 * k] = (u32)kl;
    klen[2 * k + 1] = (u32)vl;
    k++;
    i = j + 1;
  }
  put_u32le(buf, (u32)npairs);
  for (k = 0; k < npairs; k++) {
    put_u32le(buf + 4 + 8 * k, klen[2 * k]);
    put_u32le(buf + 8 + 8 * k, klen[2 * k + 1]);
  }
  memcpy(buf + 4 + 8 * npairs, data, dn);
  *ptr = (u32)(uintptr_t)buf;
  *len = (u32)(4 + 8 * npairs + dn);
}

/* An argument token used where a (ptr,len) pair is expected. */
static void arg_bytes(run_t *r, const char *t, u32 *ptr, u32 *len) {
  i64 v;
  *ptr = 0; *len = 0;
  if (!t || !strcmp(t, "null")) return;
  if (!strcmp(t, "bad")) { *ptr = 0xFFFFFF00u; *len = 16; return; }
  if (!strncmp(t, "s:", 2)) {
    size_t n = strlen(t + 2);
    unsigned char *buf = run_alloc(r, n);
    *len = (u32)pct_decode(t + 2, n, buf);
    *ptr = (u32)(uintptr_t)buf;
    return;
  }
  if (!strncmp(t, "m:", 2)) { build_map(r, t + 2, ptr, len); return; }
  /* an integer: raw pointer with length 0 */
  if (t[0] == '$') {
    if (!strcmp(t, "$self")) *ptr = (u32)r->self;
    else if (!strcmp(t, "$root")) *ptr = (u32)r->root;
    else if (!strcmp(t, "$token")) *ptr = last_token;
    else if (!strcmp(t, "$metric")) *ptr = last_metric;
    return;
  }
  if (parse_int(t, &v)) *ptr = (u32)v;
}

/* An argument token used where an integer is expected. */
static i64 arg_int(run_t *r, const char *t) {
  i64 v;
  if (!t || !strcmp(t, "null")) return 0;
  if (!strcmp(t, "bad")) return 0xFFFFFF00u;
  if (!strcmp(t, "$self")) return (u32)r->self;
  if (!strcmp(t, "$root")) return (u32)r->root;
  if (!strcmp(t, "$token")) return last_token;
  if (!strcmp(t, "$metric")) return last_metric;
  if (parse_int(t, &v)) return v;
  return 0;
}

/* ------------------------------------------------------------------ */
/* running one op                                                      */
/* ------------------------------------------------------------------ */
#define A(i) ((i32)a[i])

static i32 call_host(int op, const i64 *a) {
  switch (op) {
    case OP_log: return proxy_log(A(0), A(1), A(2));
    case OP_get_log_level: return proxy_get_log_level(A(0));
    case OP_get_current_time_nanoseconds: return proxy_get_current_time_nanoseconds(A(0));
    case OP_set_tick_period_milliseconds: return proxy_set_tick_period_milliseconds(A(0));
    case OP_get_buffer_bytes: return proxy_get_buffer_bytes(A(0), A(1), A(2), A(3), A(4));
    case OP_set_buffer_bytes: return proxy_set_buffer_bytes(A(0), A(1), A(2), A(3), A(4));
    case OP_get_buffer_status: return proxy_get_buffer_status(A(0), A(1), A(2));
    case OP_get_header_map_size: return proxy_get_header_map_size(A(0), A(1));
    case OP_get_header_map_pairs: return proxy_get_header_map_pairs(A(0), A(1), A(2));
    case OP_set_header_map_pairs: return proxy_set_header_map_pairs(A(0), A(1), A(2));
    case OP_get_header_map_value: return proxy_get_header_map_value(A(0), A(1), A(2), A(3), A(4));
    case OP_add_header_map_value: return proxy_add_header_map_value(A(0), A(1), A(2), A(3), A(4));
    case OP_replace_header_map_value: return proxy_replace_header_map_value(A(0), A(1), A(2), A(3), A(4));
    case OP_remove_header_map_value: return proxy_remove_header_map_value(A(0), A(1), A(2));
    case OP_continue_stream: return proxy_continue_stream(A(0));
    case OP_close_stream: return proxy_close_stream(A(0));
    case OP_send_local_response:
      return proxy_send_local_response(A(0), A(1), A(2), A(3), A(4), A(5), A(6), A(7));
    case OP_get_status: return proxy_get_status(A(0), A(1), A(2));
    case OP_http_call:
      return proxy_http_call(A(0), A(1), A(2), A(3), A(4), A(5), A(6), A(7), A(8), A(9));
    case OP_grpc_call:
      return proxy_grpc_call(A(0), A(1), A(2), A(3), A(4), A(5), A(6), A(7), A(8), A(9), A(10), A(11));
    case OP_grpc_stream:
      return proxy_grpc_stream(A(0), A(1), A(2), A(3), A(4), A(5), A(6), A(7), A(8));
    case OP_grpc_send: return proxy_grpc_send(A(0), A(1), A(2), A(3));
    case OP_grpc_cancel: return proxy_grpc_cancel(A(0));
    case OP_grpc_close: return proxy_grpc_close(A(0));
    case OP_set_shared_data: return proxy_set_shared_data(A(0), A(1), A(2), A(3), A(4));
    case OP_get_shared_data: return proxy_get_shared_data(A(0), A(1), A(2), A(3), A(4));
    case OP_register_shared_queue: return proxy_register_shared_queue(A(0), A(1), A(2));
    case OP_resolve_shared_queue: return proxy_resolve_shared_queue(A(0), A(1), A(2), A(3), A(4));
    case OP_enqueue_shared_queue: return proxy_enqueue_shared_queue(A(0), A(1), A(2));
    case OP_dequeue_shared_queue: return proxy_dequeue_shared_queue(A(0), A(1), A(2));
    case OP_define_metric: return proxy_define_metric(A(0), A(1), A(2), A(3));
    case OP_increment_metric: return proxy_increment_metric(A(0), a[1]);
    case OP_record_metric: return proxy_record_metric(A(0), a[1]);
    case OP_get_metric: return proxy_get_metric(A(0), A(1));
    case OP_get_property: return proxy_get_property(A(0), A(1), A(2), A(3));
    case OP_set_property: return proxy_set_property(A(0), A(1), A(2), A(3));
    case OP_set_effective_context: return proxy_set_effective_context(A(0));
    case OP_done: return proxy_done();
    case OP_call_foreign_function:
      return proxy_call_foreign_function(A(0), A(1), A(2), A(3), A(4), A(5));
    case OP_redis_init: return proxy_redis_init(A(0), A(1), A(2), A(3), A(4), A(5), A(6));
    case OP_redis_call: return proxy_redis_call(A(0), A(1), A(2), A(3), A(4));
    case OP_inject_encoded_data_to_filter_chain:
      return proxy_inject_encoded_data_to_filter_chain(A(0), A(1), A(2));
    case OP_get_upstream_hosts: return proxy_get_upstream_hosts(A(0), A(1));
    case OP_set_upstream_override_host: return proxy_set_upstream_override_host(A(0), A(1));
  }
  return -1;
}

static void conf_prefix(sb_t *b, run_t *r, const char *op) {
  sb_str(b, "conf ");
  sb_str(b, cb_names[r->cb]);
  sb_str(b, " ");
  sb_str(b, op);
}

static void run_host_op(run_t *r, int op, char **args, int nargs, int badout) {
  const char *sig = op_sigs[op];
  i64 a[16];
  u64 slots[8];
  int na = 0, ns = 0, ai = 0;
  memset(slots, 0, sizeof slots);
  for (const char *s = sig; *s; s++) {
    const char *tok = ai < nargs ? args[ai] : 0;
    switch (*s) {
      case 'i': case 'I': a[na++] = arg_int(r, tok); ai++; break;
      case 'b': { u32 p, l; arg_bytes(r, tok, &p, &l); a[na++] = p; a[na++] = l; ai++; break; }
      case 'u': case 'U': case 'T': case 'M':
        a[na++] = badout ? (i64)0xFFFFFFF0u : (i64)(uintptr_t)&slots[ns];
        ns++;
        break;
      case 'B':
        a[na++] = badout ? (i64)0xFFFFFFF0u : (i64)(uintptr_t)&slots[ns];
        a[na++] = badout ? (i64)0xFFFFFFF0u : (i64)(uintptr_t)&slots[ns + 1];
        ns += 2;
        break;
    }
  }
  i32 st = call_host(op, a);
  sb_t b = {0};
  conf_prefix(&b, r, op_names[op]);
  sb_str(&b, " status=");
  sb_i64(&b, st);
  if (!badout) {
    ns = 0;
    for (const char *s = sig; *s; s++) {
      switch (*s) {
        case 'u': case 'T': case 'M': {
          u32 v = *(u32 *)&slots[ns++];
          sb_str(&b, " out=");
          sb_u64(&b, v);
          if (st == 0 && *s == 'T') last_token = v;
          if (st == 0 && *s == 'M') last_metric = v;
          break;
        }
        case 'U':
          sb_str(&b, " out=");
          sb_u64(&b, slots[ns++]);
          break;
        case 'B': {
          u32 p = *(u32 *)&slots[ns], l = *(u32 *)&slots[ns + 1];
          ns += 2;
          sb_str(&b, " out=");
          if (p && in_memory(p, l)) {
            sb_escaped(&b, (const unsigned char *)(uintptr_t)p, l);
            free((void *)(uintptr_t)p);
          } else if (l) {
            sb_str(&b, "<badptr>");
          }
          break;
        }
      }
    }
  }
  log_at(2, &b);
}

/* ------------------------------------------------------------------ */
/* special ops                                                         */
/* ------------------------------------------------------------------ */
static void wasi_write_line(run_t *r, const char *op, int fd, const char *tok) {
  u32 p, l;
  arg_bytes(r, tok, &p, &l);
  __wasi_ciovec_t iov[2] = {{(const uint8_t *)(uintptr_t)p, l}, {(const uint8_t *)"\n", 1}};
  __wasi_size_t written = 0;
  __wasi_errno_t e = __wasi_fd_write((__wasi_fd_t)fd, iov, 2, &written);
  sb_t b = {0};
  conf_prefix(&b, r, op);
  sb_str(&b, " status=");
  sb_u64(&b, e);
  sb_str(&b, " out=");
  sb_u64(&b, written);
  log_at(2, &b);
}

/* Returns 1 if the op was a special op (handled). */
static int run_special(run_t *r, const char *op, char **args, int nargs, i32 *ret) {
  const char *t0 = nargs > 0 ? args[0] : 0;
  sb_t b = {0};
  if (!strcmp(op, "return")) {
    *ret = (i32)arg_int(r, t0);
    return 1;
  }
  if (!strcmp(op, "trap")) __builtin_trap();
  if (!strcmp(op, "loop")) {
    volatile u32 spin = 0;
    for (;;) spin++;
  }
  if (!strcmp(op, "grow")) {
    long res = (long)__builtin_wasm_memory_grow(0, (unsigned long)(u32)arg_int(r, t0));
    conf_prefix(&b, r, op);
    sb_str(&b, " result=");
    sb_i64(&b, (i32)res);
    log_at(2, &b);
    return 1;
  }
  if (!strcmp(op, "alloc")) {
    u32 n = (u32)arg_int(r, t0);
    void *p = malloc(n); /* deliberately not freed */
    if (p) memset(p, 0xAB, n);
    conf_prefix(&b, r, op);
    sb_str(&b, p ? " nonzero=yes" : " nonzero=no");
    log_at(2, &b);
    return 1;
  }
  if (!strcmp(op, "stdout")) { wasi_write_line(r, op, 1, t0); return 1; }
  if (!strcmp(op, "stderr")) { wasi_write_line(r, op, 2, t0); return 1; }
  if (!strcmp(op, "exit")) {
    wasi_proc_exit_may_return((i32)arg_int(r, t0));
    conf_prefix(&b, r, op);
    sb_str(&b, " returned");
    log_at(2, &b);
    return 1;
  }
  if (!strcmp(op, "getenv")) {
    u32 p, l;
    arg_bytes(r, t0, &p, &l);
    char *name = run_alloc(r, l + 1);
    if (l) memcpy(name, (const void *)(uintptr_t)p, l);
    name[l] = 0;
    const char *v = getenv(name);
    conf_prefix(&b, r, op);
    sb_str(&b, " value=");
    if (v) sb_escaped(&b, (const unsigned char *)v, strlen(v));
    else sb_str(&b, "<unset>");
    log_at(2, &b);
    return 1;
  }
  if (!strcmp(op, "clock")) {
    __wasi_timestamp_t rt = 0, mono = 0;
    __wasi_errno_t e1 = __wasi_clock_time_get(__WASI_CLOCKID_REALTIME, 1, &rt);
    __wasi_errno_t e2 = __wasi_clock_time_get(__WASI_CLOCKID_MONOTONIC, 1, &mono);
    conf_prefix(&b, r, op);
    sb_str(&b, " status=");
    sb_u64(&b, e1);
    sb_str(&b, " realtime=");
    sb_u64(&b, rt);
    sb_str(&b, " status=");
    sb_u64(&b, e2);
    sb_str(&b, " monotonic=");
    sb_u64(&b, mono);
    log_at(2, &b);
    return 1;
  }
  if (!strcmp(op, "random")) {
    u32 n = (u32)arg_int(r, t0);
    unsigned char *buf = run_alloc(r, n);
    memset(buf, 0, n);
    __wasi_errno_t e = __wasi_random_get(buf, n);
    conf_prefix(&b, r, op);
    sb_str(&b, " status=");
    sb_u64(&b, e);
    sb_str(&b, " hex=");
    sb_reserve(&b, 2 * (size_t)n);
    for (u32 i = 0; i < n; i++) {
      b.p[b.n++] = "0123456789abcdef"[buf[i] >> 4];
      b.p[b.n++] = "0123456789abcdef"[buf[i] & 15];
    }
    b.p[b.n] = 0;
    log_at(2, &b);
    return 1;
  }
  return 0;
}

static void run_step(run_t *r, const char *line, i32 *ret) {
  size_t l = strlen(line);
  char *copy = malloc(l + 1);
  if (!copy) __builtin_trap();
  memcpy(copy, line, l + 1);
  char *tok[32];
  int n = tokenize(copy, tok, 32);
  int badout = 0;
  if (n > 1 && !strcmp(tok[n - 1], "!badout")) { badout = 1; n--; }
  if (n > 0) {
    const char *op = tok[0];
    int found = -1;
    for (int i = 0; i < OP_COUNT; i++)
      if (!strcmp(op_names[i], op)) { found = i; break; }
    if (found >= 0) {
      run_host_op(r, found, tok + 1, n - 1, badout);
    } else if (!run_special(r, op, tok + 1, n - 1, ret)) {
      sb_t b = {0};
      sb_str(&b, "conf unknown op ");
      sb_escaped(&b, (const unsigned char *)op, strlen(op));
      log_at(4, &b);
    }
  }
  run_free(r);
  free(copy);
}

/* ------------------------------------------------------------------ */
/* callback dispatch                                                   */
/* ------------------------------------------------------------------ */
static i32 dispatch(int cb, const i32 *args, int nargs) {
  sb_t b = {0};
  sb_str(&b, "enter ");
  sb_str(&b, cb_names[cb]);
  for (int i = 0; i < nargs; i++) {
    sb_str(&b, " ");
    sb_i64(&b, args[i]);
  }
  log_at(2, &b);

  run_t r;
  r.cb = cb;
  r.nallocs = 0;
  r.self = args[0];
  if (cb == CB_context_create) {
    i32 root = args[1] ? args[1] : args[0];
    ctx_set(args[0], root);
    if (!args[1]) last_root = (u32)args[0];
    r.root = root;
  } else if (cb_is_root(cb)) {
    r.root = args[0];
    last_root = (u32)args[0];
  } else if (!ctx_get(args[0], &r.root)) {
    r.root = (i32)last_root;
  }

  if (cb == CB_vm_start) load_config(cb, 6, args[1]);
  if (cb == CB_configure || cb == CB_validate_configuration) load_config(cb, 7, args[1]);

  i32 ret = cb_kinds[cb] == K_BOOL ? 1 : 0;
  for (size_t i = 0; i < nsteps; i++) {
    if (steps[i].cb == cb) run_step(&r, steps[i].line, &ret);
  }
  if (cb == CB_delete) ctx_del(args[0]);
  return ret;
}

/* ------------------------------------------------------------------ */
/* exports                                                             */
/* ------------------------------------------------------------------ */
EXPORT("proxy_abi_version_0_2_1") void proxy_abi_version_0_2_1(void) {}

EXPORT("proxy_on_memory_allocate") void *proxy_on_memory_allocate(u32 size) {
  return malloc(size);
}

#define CB1(name, export)                                   \
  EXPORT(export) i32 cb_##name(i32 a0) {                    \
    i32 a[1] = {a0};                                        \
    return dispatch(CB_##name, a, 1);                       \
  }
#define CB2(name, export)                                   \
  EXPORT(export) i32 cb_##name(i32 a0, i32 a1) {            \
    i32 a[2] = {a0, a1};                                    \
    return dispatch(CB_##name, a, 2);                       \
  }
#define CB3(name, export)                                   \
  EXPORT(export) i32 cb_##name(i32 a0, i32 a1, i32 a2) {    \
    i32 a[3] = {a0, a1, a2};                                \
    return dispatch(CB_##name, a, 3);                       \
  }
#define VCB1(name, export)                                  \
  EXPORT(export) void cb_##name(i32 a0) {                   \
    i32 a[1] = {a0};                                        \
    dispatch(CB_##name, a, 1);                              \
  }
#define VCB2(name, export)                                  \
  EXPORT(export) void cb_##name(i32 a0, i32 a1) {           \
    i32 a[2] = {a0, a1};                                    \
    dispatch(CB_##name, a, 2);                              \
  }
#define VCB3(name, export)                                  \
  EXPORT(export) void cb_##name(i32 a0, i32 a1, i32 a2) {   \
    i32 a[3] = {a0, a1, a2};                                \
    dispatch(CB_##name, a, 3);                              \
  }

VCB2(context_create, "proxy_on_context_create")
CB2(vm_start, "proxy_on_vm_start")
CB2(configure, "proxy_on_configure")
CB2(validate_configuration, "proxy_validate_configuration")
VCB1(tick, "proxy_on_tick")
VCB2(queue_ready, "proxy_on_queue_ready")
VCB3(foreign_function, "proxy_on_foreign_function")
CB3(request_headers, "proxy_on_request_headers")
CB3(request_body, "proxy_on_request_body")
CB2(request_trailers, "proxy_on_request_trailers")
CB3(response_headers, "proxy_on_response_headers")
CB3(response_body, "proxy_on_response_body")
CB2(response_trailers, "proxy_on_response_trailers")
VCB1(log, "proxy_on_log")
CB1(done, "proxy_on_done")
VCB1(delete, "proxy_on_delete")
VCB3(grpc_receive_initial_metadata, "proxy_on_grpc_receive_initial_metadata")
VCB3(grpc_receive, "proxy_on_grpc_receive")
VCB3(grpc_receive_trailing_metadata, "proxy_on_grpc_receive_trailing_metadata")
VCB3(grpc_close, "proxy_on_grpc_close")
CB1(new_connection, "proxy_on_new_connection")
CB3(downstream_data, "proxy_on_downstream_data")
CB3(upstream_data, "proxy_on_upstream_data")
VCB2(downstream_connection_close, "proxy_on_downstream_connection_close")
VCB2(upstream_connection_close, "proxy_on_upstream_connection_close")

EXPORT("proxy_on_http_call_response")
void cb_http_call_response(i32 root, i32 token, i32 nh, i32 bs, i32 nt) {
  i32 a[5] = {root, token, nh, bs, nt};
  dispatch(CB_http_call_response, a, 5);
}

EXPORT("proxy_on_redis_call_response")
void cb_redis_call_response(i32 root, i32 token, i32 status, i32 size) {
  i32 a[4] = {root, token, status, size};
  dispatch(CB_redis_call_response, a, 4);
}
