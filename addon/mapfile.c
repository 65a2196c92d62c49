// Read-only shared mappings of image files, and the guarded copy out of them.
//
// Reading a page-cached image through a mapping is a memcpy: no syscall, no page-cache
// lookup per request. The price of mappings is SIGBUS: a page that cannot be read (an
// I/O error, or the file truncated under the mapping) raises it on access instead of
// returning an error. So copies out of these mappings run under a guard: a SIGBUS whose
// address lies in the range being copied returns EIO to the caller; any other SIGBUS is
// handled as it would have been without the guard.
#include "common.h"

#include <errno.h>
#include <pthread.h>
#include <setjmp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/uio.h>

struct file_map {
  uint8_t *base;
  size_t length; // 0 once unmapped
};

static const napi_type_tag file_map_tag = {0x76626c6b66696c65ULL, 0x3c8a61f0d2b94e17ULL};

// The guard of the copy running on this thread: where it jumps back to, and the source
// range it covers. Initial-exec TLS: the signal handler must not allocate, which the
// lazy TLS of a dlopen'ed library may do on first access.
#define GUARD_TLS __thread __attribute__((tls_model("initial-exec")))
static GUARD_TLS sigjmp_buf *volatile guard_env;
static GUARD_TLS const uint8_t *volatile guard_lo;
static GUARD_TLS const uint8_t *volatile guard_hi;

static struct sigaction previous_bus;
// Installed once per process (worker threads share it), so that the handler never
// chains to itself.
static pthread_once_t handler_once = PTHREAD_ONCE_INIT;
static int handler_error;

static void on_sigbus(int sig, siginfo_t *info, void *context) {
  const uint8_t *addr = info->si_addr;
  sigjmp_buf *env = guard_env;
  if (env != NULL && addr >= guard_lo && addr < guard_hi) {
    guard_env = NULL;
    siglongjmp(*env, 1);
  }
  // Not a guarded copy: do what was done before the guard existed.
  if (previous_bus.sa_flags & SA_SIGINFO) {
    if (previous_bus.sa_sigaction != NULL) previous_bus.sa_sigaction(sig, info, context);
    return;
  }
  if (previous_bus.sa_handler != SIG_DFL && previous_bus.sa_handler != SIG_IGN) {
    previous_bus.sa_handler(sig);
    return;
  }
  // The default action: restore it and return; the faulting access runs again and the
  // process dies of SIGBUS as it would have.
  struct sigaction dfl;
  memset(&dfl, 0, sizeof dfl);
  dfl.sa_handler = SIG_DFL;
  sigaction(SIGBUS, &dfl, NULL);
}

static void install_handler_once(void) {
  struct sigaction sa;
  memset(&sa, 0, sizeof sa);
  sa.sa_sigaction = on_sigbus;
  // NODEFER: SIGBUS stays unblocked in the handler, so the jump out of it needs no
  // saved signal mask, and setting the guard needs no sigprocmask syscall per copy.
  sa.sa_flags = SA_SIGINFO | SA_NODEFER;
  sigemptyset(&sa.sa_mask);
  if (sigaction(SIGBUS, &sa, &previous_bus) < 0) handler_error = errno;
}

static bool install_handler(napi_env env) {
  pthread_once(&handler_once, install_handler_once);
  if (handler_error == 0) return true;
  vblk_throw_errno(env, "sigaction", "SIGBUS", handler_error);
  return false;
}

// Copies `total` bytes from `src` into the iovecs; EIO when a page of the source could
// not be read (*copied then counts the buffers filled before the one that faulted).
static int guarded_copy(const uint8_t *src, size_t total, const struct iovec *iov, size_t niov, size_t *copied) {
  sigjmp_buf env;
  volatile size_t done = 0;
  if (sigsetjmp(env, 0) != 0) {
    *copied = done;
    return EIO;
  }
  guard_lo = src;
  guard_hi = src + total;
  guard_env = &env;
  for (size_t i = 0; i < niov && done < total; i++) {
    size_t n = iov[i].iov_len < total - done ? iov[i].iov_len : total - done;
    memcpy(iov[i].iov_base, src + done, n);
    done += n;
  }
  guard_env = NULL;
  *copied = done;
  return 0;
}

static void file_map_finalize(napi_env env, void *data, void *hint) {
  (void)env;
  (void)hint;
  struct file_map *m = data;
  if (m->length > 0) munmap(m->base, m->length);
  free(m);
}

static bool arg_file_map(napi_env env, napi_value v, const char *fn, struct file_map **out) {
  bool ours = false;
  napi_valuetype t;
  VBLK_NAPI_B(env, napi_typeof(env, v, &t));
  if (t == napi_external) VBLK_NAPI_B(env, napi_check_object_type_tag(env, v, &file_map_tag, &ours));
  if (!ours) {
    vblk_throw_type(env, "%s: map must come from mapFile()", fn);
    return false;
  }
  void *data;
  VBLK_NAPI_B(env, napi_get_value_external(env, v, &data));
  *out = data;
  return true;
}

// mapFile(fd, length) -> map: a read-only shared mapping of the first `length` bytes.
static napi_value js_map_file(napi_env env, napi_callback_info info) {
  const char *fn = "mapFile";
  napi_value argv[VBLK_MAX_ARGS];
  int fd;
  uint64_t length;
  if (!vblk_args(env, info, fn, 2, argv) || !vblk_arg_fd(env, argv[0], fn, "fd", &fd) ||
      !vblk_arg_uint(env, argv[1], fn, "length", 1, VBLK_MAX_SAFE_INTEGER, &length))
    return NULL;
  if (length > SIZE_MAX) return vblk_throw_range(env, "%s: length %llu does not fit the address space", fn, (unsigned long long)length);
  if (!install_handler(env)) return NULL;
  struct file_map *m = malloc(sizeof *m);
  if (m == NULL) return vblk_throw_errno(env, fn, NULL, ENOMEM);
  // NORESERVE: a sparse terabyte costs address space, not commitments.
  void *p = mmap(NULL, (size_t)length, PROT_READ, MAP_SHARED | MAP_NORESERVE, fd, 0);
  if (p == MAP_FAILED) {
    int err = errno;
    free(m);
    return vblk_throw_errno(env, "mmap", NULL, err);
  }
  m->base = p;
  m->length = (size_t)length;
  napi_value result;
  if (napi_create_external(env, m, file_map_finalize, NULL, &result) != napi_ok) {
    munmap(p, (size_t)length);
    free(m);
    vblk_napi_failed(env, "napi_create_external");
    return NULL;
  }
  VBLK_NAPI(env, napi_type_tag_object(env, result, &file_map_tag));
  return result;
}

// mappedRead(map, position, buffers) -> bytes copied: the buffers filled in order from
// `position`, short only at the end of the mapping. Throws EIO when a page of the file
// cannot be read.
static napi_value js_mapped_read(napi_env env, napi_callback_info info) {
  const char *fn = "mappedRead";
  napi_value argv[VBLK_MAX_ARGS];
  struct file_map *m;
  uint64_t position;
  vblk_iovecs v;
  if (!vblk_args(env, info, fn, 3, argv) || !arg_file_map(env, argv[0], fn, &m) ||
      !vblk_arg_uint(env, argv[1], fn, "position", 0, VBLK_MAX_SAFE_INTEGER, &position))
    return NULL;
  if (m->length == 0) return vblk_throw_code(env, "ERR_VBLK_UNMAPPED", "%s: the file is no longer mapped", fn);
  if (!vblk_iovecs_arg(env, argv[2], fn, &v)) return NULL;
  uint64_t avail = position >= m->length ? 0 : m->length - position;
  size_t want = (size_t)(v.total < avail ? v.total : avail);
  size_t copied = 0;
  int err = want == 0 ? 0 : guarded_copy(m->base + position, want, v.iov, v.niov, &copied);
  vblk_iovecs_free(&v);
  if (err == 0) return vblk_number(env, (double)copied);
  char detail[80];
  snprintf(detail, sizeof detail, "of %zu bytes at byte %llu", want, (unsigned long long)position);
  return vblk_throw_errno(env, "read of a mapped file", detail, err);
}

// unmapFile(map): releases the mapping now (later reads throw); idempotent.
static napi_value js_unmap_file(napi_env env, napi_callback_info info) {
  const char *fn = "unmapFile";
  napi_value argv[VBLK_MAX_ARGS];
  struct file_map *m;
  if (!vblk_args(env, info, fn, 1, argv) || !arg_file_map(env, argv[0], fn, &m)) return NULL;
  if (m->length > 0 && munmap(m->base, m->length) < 0) return vblk_throw_errno(env, "munmap", NULL, errno);
  m->length = 0;
  return NULL;
}

bool vblk_register_mapfile(napi_env env, napi_value exports) {
  static const vblk_function fns[] = {
      {"mapFile", js_map_file},
      {"mappedRead", js_mapped_read},
      {"unmapFile", js_unmap_file},
  };
  return vblk_export_functions(env, exports, fns, sizeof fns / sizeof fns[0]);
}
