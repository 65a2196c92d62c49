// Open file description (OFD) byte-range locks: the advisory locks QEMU takes on image
// files, which Node cannot take. Unlike classic POSIX fcntl locks they belong to the open
// file (not the process), so closing some other fd on the same image does not drop them,
// and two fds of one process conflict like two processes. Never blocks: F_OFD_SETLK.
#include "common.h"

#include <errno.h>
#include <fcntl.h>
#include <string.h>

// Lock types are checked as the range 0-2: Linux's values on every architecture.
_Static_assert(F_RDLCK == 0 && F_WRLCK == 1 && F_UNLCK == 2, "lock types are 0, 1, 2");

static bool lock_args(napi_env env, napi_callback_info info, const char *fn, struct flock *fl, int *fd) {
  napi_value argv[VBLK_MAX_ARGS];
  uint64_t start, length, type;
  if (!vblk_args(env, info, fn, 4, argv) || !vblk_arg_fd(env, argv[0], fn, "fd", fd) ||
      !vblk_arg_uint(env, argv[1], fn, "start", 0, VBLK_MAX_SAFE_INTEGER, &start) ||
      !vblk_arg_uint(env, argv[2], fn, "length", 0, VBLK_MAX_SAFE_INTEGER, &length) ||
      !vblk_arg_uint(env, argv[3], fn, "type", 0, 2, &type))
    return false;
  memset(fl, 0, sizeof *fl);
  fl->l_type = (short)type;
  fl->l_whence = SEEK_SET;
  fl->l_start = (off_t)start;
  fl->l_len = (off_t)length; // 0: to the end of the file, and beyond
  fl->l_pid = 0;             // the kernel requires 0 for OFD locks
  return true;
}

// ofdLock(fd, start, length, type) -> true when the lock is set (or removed, for
// F_UNLCK), false when another open file holds a conflicting lock.
static napi_value js_ofd_lock(napi_env env, napi_callback_info info) {
  struct flock fl;
  int fd;
  if (!lock_args(env, info, "ofdLock", &fl, &fd)) return NULL;
  for (;;) {
    if (fcntl(fd, F_OFD_SETLK, &fl) == 0) return vblk_bool(env, true);
    if (errno == EINTR) continue;
    if (errno == EAGAIN || errno == EACCES) return vblk_bool(env, false);
    return vblk_throw_errno(env, "fcntl(F_OFD_SETLK)", NULL, errno);
  }
}

// ofdTestLock(fd, start, length, type) -> null when a lock of `type` could be set, else
// { type, start, length, pid } of one lock in the way (pid -1: an OFD lock, whose owner
// the kernel does not tell).
static napi_value js_ofd_test_lock(napi_env env, napi_callback_info info) {
  struct flock fl;
  int fd;
  if (!lock_args(env, info, "ofdTestLock", &fl, &fd)) return NULL;
  while (fcntl(fd, F_OFD_GETLK, &fl) != 0) {
    if (errno != EINTR) return vblk_throw_errno(env, "fcntl(F_OFD_GETLK)", NULL, errno);
  }
  napi_value result;
  if (fl.l_type == F_UNLCK) {
    VBLK_NAPI(env, napi_get_null(env, &result));
    return result;
  }
  napi_value type = vblk_number(env, fl.l_type), start = vblk_number(env, (double)fl.l_start),
             length = vblk_number(env, (double)fl.l_len), pid = vblk_number(env, fl.l_pid);
  if (type == NULL || start == NULL || length == NULL || pid == NULL) return NULL;
  VBLK_NAPI(env, napi_create_object(env, &result));
  VBLK_NAPI(env, napi_set_named_property(env, result, "type", type));
  VBLK_NAPI(env, napi_set_named_property(env, result, "start", start));
  VBLK_NAPI(env, napi_set_named_property(env, result, "length", length));
  VBLK_NAPI(env, napi_set_named_property(env, result, "pid", pid));
  return result;
}

bool vblk_register_filelock(napi_env env, napi_value exports) {
  static const vblk_function fns[] = {
      {"ofdLock", js_ofd_lock},
      {"ofdTestLock", js_ofd_test_lock},
  };
  return vblk_export_functions(env, exports, fns, sizeof fns / sizeof fns[0]) &&
         vblk_export_number(env, exports, "F_RDLCK", F_RDLCK) && vblk_export_number(env, exports, "F_WRLCK", F_WRLCK) &&
         vblk_export_number(env, exports, "F_UNLCK", F_UNLCK);
}
