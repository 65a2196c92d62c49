// eventfd: the kick and call notifications of vhost-user. Counts coalesce: one read
// returns (and resets) everything written since the last read.
#include "common.h"

#include <errno.h>
#include <stdint.h>
#include <sys/eventfd.h>
#include <unistd.h>

// The counter saturates at 2^64 - 2; writing more fails with EAGAIN.
static napi_value js_eventfd(napi_env env, napi_callback_info info) {
  napi_value argv[VBLK_MAX_ARGS];
  uint64_t initial = 0;
  if (!vblk_args(env, info, "eventfd", 0, argv)) return NULL;
  if (!vblk_is_undefined(env, argv[0]) && !vblk_arg_uint(env, argv[0], "eventfd", "initial", 0, UINT32_MAX, &initial))
    return NULL;
  int fd = eventfd((unsigned)initial, EFD_NONBLOCK | EFD_CLOEXEC);
  if (fd < 0) return vblk_throw_errno(env, "eventfd", NULL, errno);
  return vblk_number(env, fd);
}

// eventfdRead(fd) -> the count (0 when nothing was written). Counts above 2^53 lose
// precision in the conversion to a JS number; only "non-zero" matters to callers.
static napi_value js_eventfd_read(napi_env env, napi_callback_info info) {
  napi_value argv[VBLK_MAX_ARGS];
  int fd;
  if (!vblk_args(env, info, "eventfdRead", 1, argv) || !vblk_arg_fd(env, argv[0], "eventfdRead", "fd", &fd))
    return NULL;
  uint64_t count;
  for (;;) {
    ssize_t n = read(fd, &count, sizeof count);
    if (n == (ssize_t)sizeof count) return vblk_number(env, (double)count);
    if (n >= 0) // an eventfd always reads 8 bytes: this fd is something else
      return vblk_throw_code(env, "EINVAL", "eventfdRead: read returned %zd bytes, not 8: fd %d is not an eventfd", n,
                             fd);
    if (errno == EINTR) continue;
    if (errno == EAGAIN || errno == EWOULDBLOCK) return vblk_number(env, 0);
    return vblk_throw_errno(env, "eventfd read", NULL, errno);
  }
}

// eventfdWrite(fd, n = 1): adds n to the counter.
static napi_value js_eventfd_write(napi_env env, napi_callback_info info) {
  napi_value argv[VBLK_MAX_ARGS];
  int fd;
  uint64_t count = 1;
  if (!vblk_args(env, info, "eventfdWrite", 1, argv) || !vblk_arg_fd(env, argv[0], "eventfdWrite", "fd", &fd))
    return NULL;
  if (!vblk_is_undefined(env, argv[1]) &&
      !vblk_arg_uint(env, argv[1], "eventfdWrite", "n", 1, VBLK_MAX_SAFE_INTEGER, &count))
    return NULL;
  for (;;) {
    ssize_t n = write(fd, &count, sizeof count);
    if (n == (ssize_t)sizeof count) return NULL;
    if (n >= 0)
      return vblk_throw_code(env, "EINVAL", "eventfdWrite: write took %zd bytes, not 8: fd %d is not an eventfd", n,
                             fd);
    if (errno == EINTR) continue;
    return vblk_throw_errno(env, "eventfd write", NULL, errno);
  }
}

bool vblk_register_eventfd(napi_env env, napi_value exports) {
  static const vblk_function fns[] = {
      {"eventfd", js_eventfd},
      {"eventfdRead", js_eventfd_read},
      {"eventfdWrite", js_eventfd_write},
  };
  return vblk_export_functions(env, exports, fns, sizeof fns / sizeof fns[0]);
}
