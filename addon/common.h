// Shared helpers of the vblk addon: argument checks that throw readable errors, and
// errno errors whose `code` is the errno name. Every exported function follows one
// rule: check all arguments first, then make the syscall, then build the result.
#ifndef VBLK_COMMON_H
#define VBLK_COMMON_H

#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif

#include <node_api.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/uio.h>

// Largest integer a JS number carries exactly (2^53 - 1).
#define VBLK_MAX_SAFE_INTEGER 9007199254740991ULL

// Most argument counts any addon function takes.
#define VBLK_MAX_ARGS 5

// Buffers one vectored call takes: far more than any descriptor chain the device
// accepts; bounds the allocation.
#define VBLK_MAX_SEGMENTS 65536
// Segments kept on the stack by the synchronous calls before falling back to malloc.
#define VBLK_STACK_SEGMENTS 64

// Calls a Node-API function; on failure makes sure an exception is pending and
// returns NULL from the calling function.
#define VBLK_NAPI(env, call)                                                   \
  do {                                                                         \
    if ((call) != napi_ok) {                                                   \
      vblk_napi_failed((env), #call);                                          \
      return NULL;                                                             \
    }                                                                          \
  } while (0)

// Same, for helpers that return bool.
#define VBLK_NAPI_B(env, call)                                                 \
  do {                                                                         \
    if ((call) != napi_ok) {                                                   \
      vblk_napi_failed((env), #call);                                          \
      return false;                                                            \
    }                                                                          \
  } while (0)

// Throws "internal Node-API failure" unless an exception is already pending.
void vblk_napi_failed(napi_env env, const char *what);

// Builds `Error("<syscall>[ <detail>]: <strerror> (<ENAME>)")` with `code` = errno
// name, `errno` = the positive errno and `syscall` = the call's name. Returns NULL
// if even building the error failed (an exception is then pending).
napi_value vblk_errno_error(napi_env env, const char *syscall, const char *detail, int err);

// Throws vblk_errno_error(...). Always returns NULL, so callers `return` it.
napi_value vblk_throw_errno(napi_env env, const char *syscall, const char *detail, int err);

// Throws a TypeError with code ERR_INVALID_ARG_TYPE. Returns NULL.
napi_value vblk_throw_type(napi_env env, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

// Throws a RangeError with code ERR_OUT_OF_RANGE. Returns NULL.
napi_value vblk_throw_range(napi_env env, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

// Throws an Error with the given code. Returns NULL.
napi_value vblk_throw_code(napi_env env, const char *code, const char *fmt, ...) __attribute__((format(printf, 3, 4)));

// Reads the call's arguments into argv (capacity VBLK_MAX_ARGS); throws unless at
// least `min` were passed. Missing optional arguments read as undefined.
bool vblk_args(napi_env env, napi_callback_info info, const char *fn, size_t min, napi_value *argv);

// Each argument reader throws (and returns false) with a message naming the function
// and the parameter when the value has the wrong type or range.
bool vblk_arg_fd(napi_env env, napi_value v, const char *fn, const char *name, int *out);
bool vblk_arg_uint(napi_env env, napi_value v, const char *fn, const char *name, uint64_t min, uint64_t max,
                   uint64_t *out);
bool vblk_arg_bool(napi_env env, napi_value v, const char *fn, const char *name, bool *out);
// Reads a string into buf (NUL-terminated); refuses embedded NULs and anything that
// does not fit in cap - 1 bytes.
bool vblk_arg_string(napi_env env, napi_value v, const char *fn, const char *name, char *buf, size_t cap,
                     size_t *len);
typedef enum { VBLK_VIEW_OK, VBLK_VIEW_NOT_BYTES, VBLK_VIEW_FAILED } vblk_view_result;
// The bytes of a Uint8Array (Buffer included), without throwing when v is something
// else (VBLK_VIEW_NOT_BYTES: the caller names it in its message); VBLK_VIEW_FAILED
// leaves an exception pending. A detached view reads as empty, with *detached set.
vblk_view_result vblk_view(napi_env env, napi_value v, uint8_t **data, size_t *len, bool *detached);
// Turns `buffers` (an array of `count` Uint8Arrays) into iovecs, skipping empty ones;
// *total is their byte count. Throws (returns false) for anything but a Uint8Array
// and for a detached one. iov must have room for `count` entries. `visit`, when not
// NULL, is called with each view (empty ones too) and may refuse it by returning false
// with an exception pending.
typedef bool (*vblk_view_visitor)(napi_env env, napi_value view, uint8_t *data, size_t len, void *ctx);
bool vblk_collect_views(napi_env env, napi_value buffers, const char *fn, uint32_t count, struct iovec *iov,
                        size_t *niov, uint64_t *total, vblk_view_visitor visit, void *ctx);
// The buffers argument of a synchronous vectored call as iovecs: on the stack for the
// usual few, allocated beyond. vblk_iovecs_arg checks the array (at most
// VBLK_MAX_SEGMENTS Uint8Arrays, none detached) and throws (returns false) otherwise;
// every successful call is paired with vblk_iovecs_free.
typedef struct {
  struct iovec *iov; // `stack`, or malloc'd
  size_t niov;
  uint64_t total;
  struct iovec stack[VBLK_STACK_SEGMENTS];
} vblk_iovecs;
bool vblk_iovecs_arg(napi_env env, napi_value buffers, const char *fn, vblk_iovecs *out);
void vblk_iovecs_free(vblk_iovecs *v);
// A Uint8Array (Buffer included). A detached one reads as empty; *detached (if not
// NULL) tells whether it is.
bool vblk_arg_bytes(napi_env env, napi_value v, const char *fn, const char *name, uint8_t **data, size_t *len,
                    bool *detached);
bool vblk_arg_function(napi_env env, napi_value v, const char *fn, const char *name);
// A JS array; *len receives its length.
bool vblk_arg_array(napi_env env, napi_value v, const char *fn, const char *name, uint32_t *len);

bool vblk_is_undefined(napi_env env, napi_value v);

napi_value vblk_number(napi_env env, double value);
napi_value vblk_bool(napi_env env, bool value);

// Adds the functions to exports; each module has one registration function.
typedef struct {
  const char *name;
  napi_callback fn;
} vblk_function;
bool vblk_export_functions(napi_env env, napi_value exports, const vblk_function *fns, size_t count);
bool vblk_export_number(napi_env env, napi_value exports, const char *name, double value);

bool vblk_register_socket(napi_env env, napi_value exports);
bool vblk_register_memory(napi_env env, napi_value exports);
bool vblk_register_eventfd(napi_env env, napi_value exports);
bool vblk_register_watch(napi_env env, napi_value exports);
bool vblk_register_fileio(napi_env env, napi_value exports);
bool vblk_register_mapfile(napi_env env, napi_value exports);
bool vblk_register_filelock(napi_env env, napi_value exports);

// Mapping registry (memory.c), used by the asynchronous file I/O to refuse unmapping a
// region that a thread-pool request still reads or writes.
typedef struct vblk_mapping vblk_mapping;
// Returns the live mapping containing [p, p + len) with its in-flight count raised, or
// NULL when the range is not inside one of our mappings.
vblk_mapping *vblk_mapping_pin(const void *p, size_t len);
void vblk_mapping_unpin(vblk_mapping *m);

#endif
