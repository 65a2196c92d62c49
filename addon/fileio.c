// Zero-copy file I/O for the storage backend: scatter/gather reads and writes straight
// into the caller's views (guest memory), flush, and hole punching / zeroing.
//
// Each operation comes synchronous (for when the call is known to be quick, e.g. data
// in the page cache) and asynchronous on the libuv thread pool (returning a Promise).
// An asynchronous request holds a reference to every view it uses, so none can be
// collected, and pins every mapping the views lie in, so munmap() refuses (EBUSY) to
// pull memory out from under the thread that is reading or writing it.
#include "common.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/uio.h>
#include <unistd.h>


#define VBLK_FALLOC_MODES (FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE)

typedef enum { OP_READ, OP_WRITE, OP_FDATASYNC, OP_FALLOCATE } op_kind;

static const char *const op_syscall[] = {"preadv", "pwritev", "fdatasync", "fallocate"};

typedef struct {
  napi_async_work work;
  napi_deferred deferred;
  op_kind kind;
  int fd;
  uint64_t position; // read/write: file offset; fallocate: offset
  uint64_t length;   // fallocate only
  int mode;          // fallocate only
  struct iovec *iov;
  size_t niov;
  napi_ref *refs; // one per element of the buffers array
  vblk_mapping **pins;
  uint32_t nrefs;
  uint64_t done; // result: bytes transferred
  int err;       // result: 0 or errno
} io_request;

// Reads or writes until every segment is done or (reads only) the file ends. Consumes
// iov. Returns 0 or an errno; *done counts the bytes moved before that.
static int rw_all(bool write, int fd, struct iovec *iov, size_t niov, uint64_t pos, uint64_t *done) {
  size_t i = 0;
  *done = 0;
  while (i < niov) {
    int batch = niov - i > IOV_MAX ? IOV_MAX : (int)(niov - i);
    ssize_t n = write ? pwritev(fd, iov + i, batch, (off_t)pos) : preadv(fd, iov + i, batch, (off_t)pos);
    if (n < 0) {
      if (errno == EINTR) continue;
      return errno;
    }
    // A read of 0 is the end of the file. A write of 0 should not happen; returning the
    // short count beats spinning on it.
    if (n == 0) break;
    *done += (uint64_t)n;
    pos += (uint64_t)n;
    // Skip the segments this call completed and trim the one it ended inside (short
    // counts happen at EOF, on signals, and above the kernel's 2 GiB per-call cap).
    size_t left = (size_t)n;
    while (i < niov && left >= iov[i].iov_len) left -= iov[i++].iov_len;
    if (left > 0) {
      iov[i].iov_base = (char *)iov[i].iov_base + left;
      iov[i].iov_len -= left;
    }
  }
  return 0;
}

static int fdatasync_retry(int fd) {
  while (fdatasync(fd) < 0) {
    if (errno != EINTR) return errno;
  }
  return 0;
}

static int fallocate_retry(int fd, int mode, uint64_t offset, uint64_t length) {
  while (fallocate(fd, mode, (off_t)offset, (off_t)length) < 0) {
    if (errno != EINTR) return errno;
  }
  return 0;
}

// Keeps a view an asynchronous request uses alive, and pins the mapping it lies in.
static bool hold_view(napi_env env, napi_value view, uint8_t *data, size_t len, void *ctx) {
  io_request *req = ctx;
  VBLK_NAPI_B(env, napi_create_reference(env, view, 1, &req->refs[req->nrefs]));
  req->pins[req->nrefs] = vblk_mapping_pin(data, len);
  req->nrefs++;
  return true;
}

// Turns buffers (an array of Uint8Array) into the request's iovecs, skipping empty ones,
// and references every view and pins the mappings they lie in (released by
// request_free, also on failure). req->iov must have room for the array's length.
static bool collect_buffers(napi_env env, napi_value arr, const char *fn, uint32_t count, io_request *req) {
  uint64_t total;
  return vblk_collect_views(env, arr, fn, count, req->iov, &req->niov, &total, hold_view, req);
}

static bool arg_buffers(napi_env env, napi_value v, const char *fn, uint32_t *count) {
  if (!vblk_arg_array(env, v, fn, "buffers", count)) return false;
  if (*count > VBLK_MAX_SEGMENTS) {
    vblk_throw_range(env, "%s: at most %d buffers, got %u", fn, VBLK_MAX_SEGMENTS, *count);
    return false;
  }
  return true;
}

static napi_value fd_detail_error(napi_env env, const char *syscall, int fd, int err, bool throw_it) {
  char detail[32];
  snprintf(detail, sizeof detail, "(fd %d)", fd);
  if (throw_it) return vblk_throw_errno(env, syscall, detail, err);
  return vblk_errno_error(env, syscall, detail, err);
}

// preadv(fd, buffers, position) / pwritev(...) -> bytes. Loops over short counts: a
// read returns less than asked only at end of file; a write returns everything or
// throws.
static napi_value sync_rw(napi_env env, napi_callback_info info, bool write) {
  const char *fn = write ? "pwritev" : "preadv";
  napi_value argv[VBLK_MAX_ARGS];
  int fd;
  uint64_t position;
  vblk_iovecs v;
  if (!vblk_args(env, info, fn, 3, argv) || !vblk_arg_fd(env, argv[0], fn, "fd", &fd) ||
      !vblk_arg_uint(env, argv[2], fn, "position", 0, VBLK_MAX_SAFE_INTEGER, &position) ||
      !vblk_iovecs_arg(env, argv[1], fn, &v))
    return NULL;
  uint64_t done;
  int err = rw_all(write, fd, v.iov, v.niov, position, &done);
  vblk_iovecs_free(&v);
  return err != 0 ? fd_detail_error(env, fn, fd, err, true) : vblk_number(env, (double)done);
}

static napi_value js_preadv(napi_env env, napi_callback_info info) { return sync_rw(env, info, false); }
static napi_value js_pwritev(napi_env env, napi_callback_info info) { return sync_rw(env, info, true); }

// tryPreadv(fd, buffers, position) -> bytes, or -1 if the data is not in the page cache
// (one preadv2 with RWF_NOWAIT: it never waits for the disk). The count may be short;
// the caller reads the rest asynchronously. Filesystems without RWF_NOWAIT support
// throw EOPNOTSUPP.
static napi_value js_try_preadv(napi_env env, napi_callback_info info) {
  const char *fn = "tryPreadv";
  napi_value argv[VBLK_MAX_ARGS];
  int fd;
  uint64_t position;
  vblk_iovecs v;
  if (!vblk_args(env, info, fn, 3, argv) || !vblk_arg_fd(env, argv[0], fn, "fd", &fd) ||
      !vblk_arg_uint(env, argv[2], fn, "position", 0, VBLK_MAX_SAFE_INTEGER, &position) ||
      !vblk_iovecs_arg(env, argv[1], fn, &v))
    return NULL;
  ssize_t n;
  do {
    n = v.niov == 0 ? 0 : preadv2(fd, v.iov, v.niov > IOV_MAX ? IOV_MAX : (int)v.niov, (off_t)position, RWF_NOWAIT);
  } while (n < 0 && errno == EINTR);
  int err = errno;
  vblk_iovecs_free(&v);
  if (n >= 0) return vblk_number(env, (double)n);
  if (err == EAGAIN || err == EWOULDBLOCK) return vblk_number(env, -1);
  return fd_detail_error(env, "preadv2", fd, err, true);
}

static napi_value js_fdatasync(napi_env env, napi_callback_info info) {
  napi_value argv[VBLK_MAX_ARGS];
  int fd;
  if (!vblk_args(env, info, "fdatasync", 1, argv) || !vblk_arg_fd(env, argv[0], "fdatasync", "fd", &fd)) return NULL;
  int err = fdatasync_retry(fd);
  return err != 0 ? fd_detail_error(env, "fdatasync", fd, err, true) : NULL;
}

static bool fallocate_args(napi_env env, napi_value *argv, const char *fn, int *fd, int *mode, uint64_t *offset,
                           uint64_t *length) {
  uint64_t m;
  if (!vblk_arg_fd(env, argv[0], fn, "fd", fd) || !vblk_arg_uint(env, argv[1], fn, "mode", 0, INT32_MAX, &m) ||
      !vblk_arg_uint(env, argv[2], fn, "offset", 0, VBLK_MAX_SAFE_INTEGER, offset) ||
      !vblk_arg_uint(env, argv[3], fn, "length", 1, VBLK_MAX_SAFE_INTEGER, length))
    return false;
  if ((m & ~(uint64_t)VBLK_FALLOC_MODES) != 0) {
    vblk_throw_range(env, "%s: mode 0x%llx has bits other than KEEP_SIZE, PUNCH_HOLE and ZERO_RANGE", fn,
                     (unsigned long long)m);
    return false;
  }
  *mode = (int)m;
  return true;
}

// fallocate(fd, mode, offset, length). EOPNOTSUPP (and EINVAL for unsupported mode
// combinations) comes back as the error's code so the caller can write zeroes instead.
static napi_value js_fallocate(napi_env env, napi_callback_info info) {
  napi_value argv[VBLK_MAX_ARGS];
  int fd, mode;
  uint64_t offset, length;
  if (!vblk_args(env, info, "fallocate", 4, argv) ||
      !fallocate_args(env, argv, "fallocate", &fd, &mode, &offset, &length))
    return NULL;
  int err = fallocate_retry(fd, mode, offset, length);
  return err != 0 ? fd_detail_error(env, "fallocate", fd, err, true) : NULL;
}

// ---- asynchronous variants ----

static void request_free(napi_env env, io_request *req) {
  for (uint32_t i = 0; i < req->nrefs; i++) {
    napi_delete_reference(env, req->refs[i]);
    if (req->pins[i] != NULL) vblk_mapping_unpin(req->pins[i]);
  }
  if (req->work != NULL) napi_delete_async_work(env, req->work);
  free(req->iov);
  free(req->refs);
  free(req->pins);
  free(req);
}

static void request_execute(napi_env env, void *data) {
  (void)env; // thread pool: no Node-API calls here
  io_request *req = data;
  switch (req->kind) {
  case OP_READ:
  case OP_WRITE:
    req->err = rw_all(req->kind == OP_WRITE, req->fd, req->iov, req->niov, req->position, &req->done);
    break;
  case OP_FDATASYNC:
    req->err = fdatasync_retry(req->fd);
    break;
  case OP_FALLOCATE:
    req->err = fallocate_retry(req->fd, req->mode, req->position, req->length);
    break;
  }
}

static void request_complete(napi_env env, napi_status status, void *data) {
  io_request *req = data;
  napi_value value = NULL;
  // The work is never cancelled; treat a status other than ok as an interrupted call.
  int err = status != napi_ok ? EINTR : req->err;
  if (err != 0) {
    value = fd_detail_error(env, op_syscall[req->kind], req->fd, err, false);
    if (value != NULL) napi_reject_deferred(env, req->deferred, value);
  } else {
    if (req->kind == OP_READ || req->kind == OP_WRITE)
      napi_create_double(env, (double)req->done, &value);
    else
      napi_get_undefined(env, &value);
    if (value != NULL) napi_resolve_deferred(env, req->deferred, value);
  }
  request_free(env, req);
}

// Queues req and returns its promise; frees req on failure.
static napi_value request_queue(napi_env env, io_request *req) {
  napi_value promise, name;
  if (napi_create_promise(env, &req->deferred, &promise) != napi_ok ||
      napi_create_string_utf8(env, op_syscall[req->kind], NAPI_AUTO_LENGTH, &name) != napi_ok ||
      napi_create_async_work(env, NULL, name, request_execute, request_complete, req, &req->work) != napi_ok ||
      napi_queue_async_work(env, req->work) != napi_ok) {
    // A created deferred that is never settled is only garbage; nothing leaks.
    request_free(env, req);
    vblk_napi_failed(env, "queueing asynchronous I/O");
    return NULL;
  }
  return promise;
}

static napi_value async_rw(napi_env env, napi_callback_info info, bool write) {
  const char *fn = write ? "pwritevAsync" : "preadvAsync";
  napi_value argv[VBLK_MAX_ARGS];
  int fd;
  uint32_t count;
  uint64_t position;
  if (!vblk_args(env, info, fn, 3, argv) || !vblk_arg_fd(env, argv[0], fn, "fd", &fd) ||
      !arg_buffers(env, argv[1], fn, &count) ||
      !vblk_arg_uint(env, argv[2], fn, "position", 0, VBLK_MAX_SAFE_INTEGER, &position))
    return NULL;
  io_request *req = calloc(1, sizeof *req);
  size_t n = count > 0 ? count : 1;
  if (req == NULL || (req->iov = malloc(sizeof *req->iov * n)) == NULL ||
      (req->refs = malloc(sizeof *req->refs * n)) == NULL || (req->pins = malloc(sizeof *req->pins * n)) == NULL) {
    if (req != NULL) request_free(env, req);
    return vblk_throw_errno(env, fn, NULL, ENOMEM);
  }
  req->kind = write ? OP_WRITE : OP_READ;
  req->fd = fd;
  req->position = position;
  if (!collect_buffers(env, argv[1], fn, count, req)) {
    request_free(env, req);
    return NULL;
  }
  return request_queue(env, req);
}

static napi_value js_preadv_async(napi_env env, napi_callback_info info) { return async_rw(env, info, false); }
static napi_value js_pwritev_async(napi_env env, napi_callback_info info) { return async_rw(env, info, true); }

static napi_value js_fdatasync_async(napi_env env, napi_callback_info info) {
  napi_value argv[VBLK_MAX_ARGS];
  int fd;
  if (!vblk_args(env, info, "fdatasyncAsync", 1, argv) || !vblk_arg_fd(env, argv[0], "fdatasyncAsync", "fd", &fd))
    return NULL;
  io_request *req = calloc(1, sizeof *req);
  if (req == NULL) return vblk_throw_errno(env, "fdatasyncAsync", NULL, ENOMEM);
  req->kind = OP_FDATASYNC;
  req->fd = fd;
  return request_queue(env, req);
}

static napi_value js_fallocate_async(napi_env env, napi_callback_info info) {
  napi_value argv[VBLK_MAX_ARGS];
  int fd, mode;
  uint64_t offset, length;
  if (!vblk_args(env, info, "fallocateAsync", 4, argv) ||
      !fallocate_args(env, argv, "fallocateAsync", &fd, &mode, &offset, &length))
    return NULL;
  io_request *req = calloc(1, sizeof *req);
  if (req == NULL) return vblk_throw_errno(env, "fallocateAsync", NULL, ENOMEM);
  req->kind = OP_FALLOCATE;
  req->fd = fd;
  req->mode = mode;
  req->position = offset;
  req->length = length;
  return request_queue(env, req);
}

bool vblk_register_fileio(napi_env env, napi_value exports) {
  static const vblk_function fns[] = {
      {"preadv", js_preadv},
      {"pwritev", js_pwritev},
      {"tryPreadv", js_try_preadv},
      {"preadvAsync", js_preadv_async},
      {"pwritevAsync", js_pwritev_async},
      {"fdatasync", js_fdatasync},
      {"fdatasyncAsync", js_fdatasync_async},
      {"fallocate", js_fallocate},
      {"fallocateAsync", js_fallocate_async},
  };
  return vblk_export_functions(env, exports, fns, sizeof fns / sizeof fns[0]) &&
         vblk_export_number(env, exports, "FALLOC_FL_KEEP_SIZE", FALLOC_FL_KEEP_SIZE) &&
         vblk_export_number(env, exports, "FALLOC_FL_PUNCH_HOLE", FALLOC_FL_PUNCH_HOLE) &&
         vblk_export_number(env, exports, "FALLOC_FL_ZERO_RANGE", FALLOC_FL_ZERO_RANGE) &&
         vblk_export_number(env, exports, "MAX_SEGMENTS", VBLK_MAX_SEGMENTS);
}
