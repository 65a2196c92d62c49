#include "common.h"


#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <uv.h>

void vblk_napi_failed(napi_env env, const char *what) {
  bool pending = false;
  if (napi_is_exception_pending(env, &pending) == napi_ok && pending) return;
  const napi_extended_error_info *info = NULL;
  const char *reason = "unknown";
  if (napi_get_last_error_info(env, &info) == napi_ok && info != NULL && info->error_message != NULL)
    reason = info->error_message;
  char msg[256];
  snprintf(msg, sizeof msg, "vblk native: internal Node-API failure (%s) in %s", reason, what);
  napi_throw_error(env, "ERR_VBLK_NAPI", msg);
}

napi_value vblk_errno_error(napi_env env, const char *syscall, const char *detail, int err) {
  char name[64];
  // libuv's error codes are negated errnos on Unix, so its name table is the errno
  // name table (EAGAIN, EBADF, ...), which glibc only offers from 2.32 on.
  uv_err_name_r(-err, name, sizeof name);
  if (name[0] != 'E') snprintf(name, sizeof name, "UNKNOWN");

  char text[128];
  const char *reason = strerror_r(err, text, sizeof text);
  char msg[1024];
  if (detail != NULL && detail[0] != '\0')
    snprintf(msg, sizeof msg, "%s %s: %s (%s)", syscall, detail, reason, name);
  else
    snprintf(msg, sizeof msg, "%s: %s (%s)", syscall, reason, name);

  napi_value code_v, msg_v, error, errno_v, syscall_v;
  if (napi_create_string_utf8(env, name, NAPI_AUTO_LENGTH, &code_v) != napi_ok ||
      napi_create_string_utf8(env, msg, NAPI_AUTO_LENGTH, &msg_v) != napi_ok ||
      napi_create_error(env, code_v, msg_v, &error) != napi_ok ||
      napi_create_int32(env, err, &errno_v) != napi_ok ||
      napi_set_named_property(env, error, "errno", errno_v) != napi_ok ||
      napi_create_string_utf8(env, syscall, NAPI_AUTO_LENGTH, &syscall_v) != napi_ok ||
      napi_set_named_property(env, error, "syscall", syscall_v) != napi_ok) {
    vblk_napi_failed(env, "vblk_errno_error");
    return NULL;
  }
  return error;
}

napi_value vblk_throw_errno(napi_env env, const char *syscall, const char *detail, int err) {
  napi_value error = vblk_errno_error(env, syscall, detail, err);
  if (error != NULL) napi_throw(env, error);
  return NULL;
}

typedef napi_status (*error_ctor)(napi_env, napi_value, napi_value, napi_value *);

static napi_value throw_formatted(napi_env env, error_ctor ctor, const char *code, const char *fmt, va_list ap) {
  char msg[512];
  vsnprintf(msg, sizeof msg, fmt, ap);
  napi_value code_v, msg_v, error;
  if (napi_create_string_utf8(env, code, NAPI_AUTO_LENGTH, &code_v) != napi_ok ||
      napi_create_string_utf8(env, msg, NAPI_AUTO_LENGTH, &msg_v) != napi_ok ||
      ctor(env, code_v, msg_v, &error) != napi_ok || napi_throw(env, error) != napi_ok)
    vblk_napi_failed(env, "throw_formatted");
  return NULL;
}

napi_value vblk_throw_type(napi_env env, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  throw_formatted(env, napi_create_type_error, "ERR_INVALID_ARG_TYPE", fmt, ap);
  va_end(ap);
  return NULL;
}

napi_value vblk_throw_range(napi_env env, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  throw_formatted(env, napi_create_range_error, "ERR_OUT_OF_RANGE", fmt, ap);
  va_end(ap);
  return NULL;
}

napi_value vblk_throw_code(napi_env env, const char *code, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  throw_formatted(env, napi_create_error, code, fmt, ap);
  va_end(ap);
  return NULL;
}

bool vblk_args(napi_env env, napi_callback_info info, const char *fn, size_t min, napi_value *argv) {
  size_t argc = VBLK_MAX_ARGS;
  VBLK_NAPI_B(env, napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  if (argc < min) {
    vblk_throw_type(env, "%s: expected at least %zu argument%s, got %zu", fn, min, min == 1 ? "" : "s", argc);
    return false;
  }
  // napi_get_cb_info fills missing slots with undefined up to the capacity.
  return true;
}

static bool get_number(napi_env env, napi_value v, const char *fn, const char *name, double *out) {
  // One call on the hot paths: the getter itself says when v is not a number.
  napi_status status = napi_get_value_double(env, v, out);
  if (status == napi_number_expected) {
    vblk_throw_type(env, "%s: %s must be a number", fn, name);
    return false;
  }
  VBLK_NAPI_B(env, status);
  return true;
}

bool vblk_arg_uint(napi_env env, napi_value v, const char *fn, const char *name, uint64_t min, uint64_t max,
                   uint64_t *out) {
  double d;
  if (!get_number(env, v, fn, name, &d)) return false;
  // Compare as doubles first: min and max are at most 2^53 - 1, so exact.
  if (!isfinite(d) || d != floor(d) || d < (double)min || d > (double)max) {
    vblk_throw_range(env, "%s: %s must be an integer in [%llu, %llu], got %.17g", fn, name,
                     (unsigned long long)min, (unsigned long long)max, d);
    return false;
  }
  *out = (uint64_t)d;
  return true;
}

bool vblk_arg_fd(napi_env env, napi_value v, const char *fn, const char *name, int *out) {
  uint64_t fd;
  if (!vblk_arg_uint(env, v, fn, name, 0, INT32_MAX, &fd)) return false;
  *out = (int)fd;
  return true;
}

bool vblk_arg_bool(napi_env env, napi_value v, const char *fn, const char *name, bool *out) {
  napi_valuetype t;
  VBLK_NAPI_B(env, napi_typeof(env, v, &t));
  if (t != napi_boolean) {
    vblk_throw_type(env, "%s: %s must be a boolean", fn, name);
    return false;
  }
  VBLK_NAPI_B(env, napi_get_value_bool(env, v, out));
  return true;
}

bool vblk_arg_string(napi_env env, napi_value v, const char *fn, const char *name, char *buf, size_t cap,
                     size_t *len) {
  napi_valuetype t;
  VBLK_NAPI_B(env, napi_typeof(env, v, &t));
  if (t != napi_string) {
    vblk_throw_type(env, "%s: %s must be a string", fn, name);
    return false;
  }
  size_t need;
  VBLK_NAPI_B(env, napi_get_value_string_utf8(env, v, NULL, 0, &need));
  if (need + 1 > cap) {
    vblk_throw_range(env, "%s: %s is %zu bytes long in UTF-8, at most %zu are allowed", fn, name, need, cap - 1);
    return false;
  }
  VBLK_NAPI_B(env, napi_get_value_string_utf8(env, v, buf, cap, len));
  if (strlen(buf) != *len) {
    vblk_throw_type(env, "%s: %s must not contain NUL characters", fn, name);
    return false;
  }
  return true;
}

vblk_view_result vblk_view(napi_env env, napi_value v, uint8_t **data, size_t *len, bool *detached) {
  napi_typedarray_type type = napi_int8_array;
  void *p = NULL;
  size_t n = 0;
  napi_value ab = NULL;
  // The getter refuses anything but a typed array itself (napi_invalid_arg), which
  // spares a napi_is_typedarray call per buffer on the I/O paths.
  napi_status status = napi_get_typedarray_info(env, v, &type, &n, &p, &ab, NULL);
  if (status == napi_invalid_arg) return VBLK_VIEW_NOT_BYTES;
  if (status != napi_ok) {
    vblk_napi_failed(env, "napi_get_typedarray_info");
    return VBLK_VIEW_FAILED;
  }
  if (type != napi_uint8_array) return VBLK_VIEW_NOT_BYTES;
  // A detached view reads as empty, with no data pointer: only the ArrayBuffer tells
  // it from a view that is empty by construction, so only empty views ask.
  bool is_detached = false;
  if (n == 0 && napi_is_detached_arraybuffer(env, ab, &is_detached) != napi_ok) {
    vblk_napi_failed(env, "napi_is_detached_arraybuffer");
    return VBLK_VIEW_FAILED;
  }
  *detached = is_detached;
  *data = p;
  *len = n;
  return VBLK_VIEW_OK;
}

bool vblk_collect_views(napi_env env, napi_value buffers, const char *fn, uint32_t count, struct iovec *iov,
                        size_t *niov, uint64_t *total, vblk_view_visitor visit, void *ctx) {
  *niov = 0;
  *total = 0;
  for (uint32_t i = 0; i < count; i++) {
    napi_value el;
    uint8_t *data = NULL;
    size_t len = 0;
    bool detached = false;
    VBLK_NAPI_B(env, napi_get_element(env, buffers, i, &el));
    vblk_view_result r = vblk_view(env, el, &data, &len, &detached);
    if (r == VBLK_VIEW_FAILED) return false;
    if (r == VBLK_VIEW_NOT_BYTES) {
      vblk_throw_type(env, "%s: buffers[%u] must be a Uint8Array", fn, i);
      return false;
    }
    if (detached) {
      vblk_throw_code(env, "ERR_VBLK_DETACHED", "%s: buffers[%u] is detached (its memory was unmapped)", fn, i);
      return false;
    }
    if (visit != NULL && !visit(env, el, data, len, ctx)) return false;
    *total += len; // at most 65536 segments of at most 2^32 bytes: no overflow
    if (*total > VBLK_MAX_SAFE_INTEGER) {
      vblk_throw_range(env, "%s: the buffers add up to more than 2^53 - 1 bytes", fn);
      return false;
    }
    if (len == 0) continue;
    iov[*niov].iov_base = data;
    iov[*niov].iov_len = len;
    (*niov)++;
  }
  return true;
}

bool vblk_iovecs_arg(napi_env env, napi_value buffers, const char *fn, vblk_iovecs *out) {
  uint32_t count;
  if (!vblk_arg_array(env, buffers, fn, "buffers", &count)) return false;
  if (count > VBLK_MAX_SEGMENTS) {
    vblk_throw_range(env, "%s: at most %d buffers, got %u", fn, VBLK_MAX_SEGMENTS, count);
    return false;
  }
  out->iov = count <= VBLK_STACK_SEGMENTS ? out->stack : malloc(sizeof *out->iov * count);
  if (out->iov == NULL) {
    vblk_throw_errno(env, fn, NULL, ENOMEM);
    return false;
  }
  if (!vblk_collect_views(env, buffers, fn, count, out->iov, &out->niov, &out->total, NULL, NULL)) {
    vblk_iovecs_free(out);
    return false;
  }
  return true;
}

void vblk_iovecs_free(vblk_iovecs *v) {
  if (v->iov != v->stack) free(v->iov);
  v->iov = v->stack;
}

bool vblk_arg_bytes(napi_env env, napi_value v, const char *fn, const char *name, uint8_t **data, size_t *len,
                    bool *detached) {
  bool is_detached = false;
  vblk_view_result r = vblk_view(env, v, data, len, &is_detached);
  if (r == VBLK_VIEW_NOT_BYTES) vblk_throw_type(env, "%s: %s must be a Uint8Array", fn, name);
  if (r != VBLK_VIEW_OK) return false;
  if (detached != NULL) *detached = is_detached;
  return true;
}

bool vblk_arg_function(napi_env env, napi_value v, const char *fn, const char *name) {
  napi_valuetype t;
  VBLK_NAPI_B(env, napi_typeof(env, v, &t));
  if (t != napi_function) {
    vblk_throw_type(env, "%s: %s must be a function", fn, name);
    return false;
  }
  return true;
}

bool vblk_arg_array(napi_env env, napi_value v, const char *fn, const char *name, uint32_t *len) {
  bool is_array = false;
  VBLK_NAPI_B(env, napi_is_array(env, v, &is_array));
  if (!is_array) {
    vblk_throw_type(env, "%s: %s must be an array", fn, name);
    return false;
  }
  VBLK_NAPI_B(env, napi_get_array_length(env, v, len));
  return true;
}

bool vblk_is_undefined(napi_env env, napi_value v) {
  napi_valuetype t = napi_undefined;
  napi_typeof(env, v, &t);
  return t == napi_undefined;
}

napi_value vblk_number(napi_env env, double value) {
  napi_value v;
  VBLK_NAPI(env, napi_create_double(env, value, &v));
  return v;
}

napi_value vblk_bool(napi_env env, bool value) {
  napi_value v;
  VBLK_NAPI(env, napi_get_boolean(env, value, &v));
  return v;
}

bool vblk_export_functions(napi_env env, napi_value exports, const vblk_function *fns, size_t count) {
  for (size_t i = 0; i < count; i++) {
    napi_value f;
    VBLK_NAPI_B(env, napi_create_function(env, fns[i].name, NAPI_AUTO_LENGTH, fns[i].fn, NULL, &f));
    VBLK_NAPI_B(env, napi_set_named_property(env, exports, fns[i].name, f));
  }
  return true;
}

bool vblk_export_number(napi_env env, napi_value exports, const char *name, double value) {
  napi_value v;
  VBLK_NAPI_B(env, napi_create_double(env, value, &v));
  VBLK_NAPI_B(env, napi_set_named_property(env, exports, name, v));
  return true;
}
