// Shared memory: memfd, mmap as external ArrayBuffers, and the plain fd helpers
// (close, dup, fstat size, seals, O_NONBLOCK).
//
// Every mapping has a record in a process-wide registry. The registry is what lets
// munmap() tell "already unmapped" and "not ours" apart from a live mapping (so neither
// crashes), and lets asynchronous file I/O pin a mapping so that it cannot be unmapped
// while a thread-pool request still reads or writes it.
#include "common.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

// Node 20 refuses external ArrayBuffers above buffer.constants.MAX_LENGTH (2^32).
#define VBLK_MMAP_MAX_LENGTH 4294967296ULL

// memfd_create names are at most 249 bytes (the kernel prefixes "memfd:").
#define VBLK_MEMFD_NAME_MAX 249

struct vblk_mapping {
  struct vblk_mapping *next;
  void *addr;
  size_t len;
  unsigned inflight; // asynchronous I/O requests using this mapping right now
  bool mapped;       // false once explicitly unmapped; the finalizer then only frees
};

// Guards the list and every record's inflight and mapped fields. Worker threads have
// their own Node-API environments but share this process-wide list.
static pthread_mutex_t registry_lock = PTHREAD_MUTEX_INITIALIZER;
static struct vblk_mapping *registry;
static unsigned registry_count;

// Marks ArrayBuffers created by mmap(), so munmap() can refuse anything else even once
// it is detached.
static const napi_type_tag mapping_tag = {0x76626c6b6d6d6170ULL, 0x9d1c5e0a43f2b871ULL};

static void registry_remove_locked(struct vblk_mapping *m) {
  for (struct vblk_mapping **p = &registry; *p != NULL; p = &(*p)->next) {
    if (*p == m) {
      *p = m->next;
      registry_count--;
      return;
    }
  }
}

vblk_mapping *vblk_mapping_pin(const void *p, size_t len) {
  const char *start = p;
  struct vblk_mapping *found = NULL;
  pthread_mutex_lock(&registry_lock);
  for (struct vblk_mapping *m = registry; m != NULL; m = m->next) {
    const char *base = m->addr;
    // Written as differences so that no pointer arithmetic can overflow.
    if (start >= base && (size_t)(start - base) <= m->len && len <= m->len - (size_t)(start - base)) {
      m->inflight++;
      found = m;
      break;
    }
  }
  pthread_mutex_unlock(&registry_lock);
  return found;
}

void vblk_mapping_unpin(vblk_mapping *m) {
  pthread_mutex_lock(&registry_lock);
  m->inflight--;
  pthread_mutex_unlock(&registry_lock);
}

// Runs on the JS thread once V8 has let go of the backing store: after the buffer was
// garbage collected, or after munmap() detached it (then it only frees the record).
static void mapping_finalize(napi_env env, void *data, void *hint) {
  (void)env;
  (void)data;
  struct vblk_mapping *m = hint;
  pthread_mutex_lock(&registry_lock);
  bool unmap = m->mapped;
  if (unmap) {
    m->mapped = false;
    registry_remove_locked(m);
  }
  pthread_mutex_unlock(&registry_lock);
  if (unmap) munmap(m->addr, m->len);
  free(m);
}

// mmap(fd, length, offset, writable) -> { buffer: ArrayBuffer, address: bigint }
static napi_value js_mmap(napi_env env, napi_callback_info info) {
  napi_value argv[VBLK_MAX_ARGS];
  int fd;
  uint64_t length, offset;
  bool writable;
  long page = sysconf(_SC_PAGESIZE);
  if (!vblk_args(env, info, "mmap", 4, argv) || !vblk_arg_fd(env, argv[0], "mmap", "fd", &fd) ||
      !vblk_arg_uint(env, argv[1], "mmap", "length", 1, VBLK_MMAP_MAX_LENGTH, &length) ||
      !vblk_arg_uint(env, argv[2], "mmap", "offset", 0, VBLK_MAX_SAFE_INTEGER, &offset) ||
      !vblk_arg_bool(env, argv[3], "mmap", "writable", &writable))
    return NULL;
  if (offset % (uint64_t)page != 0)
    return vblk_throw_range(env, "mmap: offset %llu is not a multiple of the page size (%ld)",
                            (unsigned long long)offset, page);

  // Touching a page of a MAP_SHARED mapping beyond the end of its file raises SIGBUS
  // and kills the process; refuse such a mapping up front. (A peer that shrinks an
  // unsealed file after we mapped it can still do this: seal what you create.)
  struct stat st;
  if (fstat(fd, &st) < 0) return vblk_throw_errno(env, "fstat", NULL, errno);
  if (S_ISREG(st.st_mode) && (uint64_t)st.st_size < offset + length) // both <= 2^53: no overflow
    return vblk_throw_range(env, "mmap: bytes [%llu, %llu) lie beyond the end of the file (%lld bytes)",
                            (unsigned long long)offset, (unsigned long long)(offset + length),
                            (long long)st.st_size);

  void *addr = mmap(NULL, length, PROT_READ | (writable ? PROT_WRITE : 0), MAP_SHARED, fd, (off_t)offset);
  if (addr == MAP_FAILED) return vblk_throw_errno(env, "mmap", NULL, errno);

  struct vblk_mapping *m = calloc(1, sizeof *m);
  if (m == NULL) {
    munmap(addr, length);
    return vblk_throw_errno(env, "mmap", "(registry record)", ENOMEM);
  }
  m->addr = addr;
  m->len = length;
  m->mapped = true;
  pthread_mutex_lock(&registry_lock);
  m->next = registry;
  registry = m;
  registry_count++;
  pthread_mutex_unlock(&registry_lock);

  napi_value buffer;
  if (napi_create_external_arraybuffer(env, addr, length, mapping_finalize, m, &buffer) != napi_ok) {
    // No finalizer will run for a buffer that was never created.
    mapping_finalize(env, addr, m);
    vblk_napi_failed(env, "napi_create_external_arraybuffer");
    return NULL;
  }
  // From here on the finalizer owns the record and the mapping.
  napi_value result, address;
  VBLK_NAPI(env, napi_type_tag_object(env, buffer, &mapping_tag));
  VBLK_NAPI(env, napi_create_object(env, &result));
  VBLK_NAPI(env, napi_create_bigint_uint64(env, (uint64_t)(uintptr_t)addr, &address));
  VBLK_NAPI(env, napi_set_named_property(env, result, "buffer", buffer));
  VBLK_NAPI(env, napi_set_named_property(env, result, "address", address));
  return result;
}

// munmap(buffer) -> true when it unmapped, false when the buffer was already unmapped.
// Detaches the ArrayBuffer first, so every view on it reads as empty afterwards instead
// of faulting.
static napi_value js_munmap(napi_env env, napi_callback_info info) {
  napi_value argv[VBLK_MAX_ARGS];
  if (!vblk_args(env, info, "munmap", 1, argv)) return NULL;
  bool is_ab = false, ours = false;
  VBLK_NAPI(env, napi_is_arraybuffer(env, argv[0], &is_ab));
  if (is_ab) VBLK_NAPI(env, napi_check_object_type_tag(env, argv[0], &mapping_tag, &ours));
  if (!ours) return vblk_throw_type(env, "munmap: buffer must be an ArrayBuffer returned by mmap()");

  void *data = NULL;
  size_t len = 0;
  VBLK_NAPI(env, napi_get_arraybuffer_info(env, argv[0], &data, &len));
  if (data == NULL) return vblk_bool(env, false); // detached: unmapped before

  pthread_mutex_lock(&registry_lock);
  struct vblk_mapping *m = registry;
  while (m != NULL && !(m->addr == data && m->len == len)) m = m->next;
  unsigned inflight = m != NULL ? m->inflight : 0;
  if (m != NULL && inflight == 0) {
    // Claim the unmap before detaching: should detaching run the finalizer at once, it
    // must find nothing left to unmap.
    m->mapped = false;
    registry_remove_locked(m);
  }
  pthread_mutex_unlock(&registry_lock);
  if (m == NULL)
    return vblk_throw_code(env, "ERR_VBLK_NOT_MAPPED", "munmap: this buffer is no longer backed by a live mapping");
  if (inflight > 0)
    return vblk_throw_code(env, "EBUSY", "munmap: %u asynchronous I/O request%s still use%s this mapping", inflight,
                           inflight == 1 ? "" : "s", inflight == 1 ? "s" : "");

  if (napi_detach_arraybuffer(env, argv[0]) != napi_ok) {
    pthread_mutex_lock(&registry_lock);
    m->mapped = true;
    m->next = registry;
    registry = m;
    registry_count++;
    pthread_mutex_unlock(&registry_lock);
    vblk_napi_failed(env, "napi_detach_arraybuffer");
    return NULL;
  }
  // m may be freed by now (finalizer); only data and len are used below.
  if (munmap(data, len) < 0) return vblk_throw_errno(env, "munmap", NULL, errno);
  return vblk_bool(env, true);
}

// mappingCount() -> live mappings in this process (diagnostics and leak tests).
static napi_value js_mapping_count(napi_env env, napi_callback_info info) {
  (void)info;
  pthread_mutex_lock(&registry_lock);
  unsigned n = registry_count;
  pthread_mutex_unlock(&registry_lock);
  return vblk_number(env, n);
}

// memfdCreate(name, size, seal) -> fd
static napi_value js_memfd_create(napi_env env, napi_callback_info info) {
  napi_value argv[VBLK_MAX_ARGS];
  char name[VBLK_MEMFD_NAME_MAX + 1];
  size_t name_len;
  uint64_t size;
  bool seal;
  if (!vblk_args(env, info, "memfdCreate", 3, argv) ||
      !vblk_arg_string(env, argv[0], "memfdCreate", "name", name, sizeof name, &name_len) ||
      !vblk_arg_uint(env, argv[1], "memfdCreate", "size", 0, VBLK_MAX_SAFE_INTEGER, &size) ||
      !vblk_arg_bool(env, argv[2], "memfdCreate", "seal", &seal))
    return NULL;
  int fd = memfd_create(name, MFD_CLOEXEC | MFD_ALLOW_SEALING);
  if (fd < 0) return vblk_throw_errno(env, "memfd_create", name, errno);
  const char *failed = NULL;
  if (ftruncate(fd, (off_t)size) < 0)
    failed = "ftruncate";
  else if (seal && fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL) < 0)
    failed = "fcntl(F_ADD_SEALS)";
  if (failed != NULL) {
    int err = errno;
    close(fd);
    return vblk_throw_errno(env, failed, name, err);
  }
  return vblk_number(env, fd);
}

static napi_value js_get_seals(napi_env env, napi_callback_info info) {
  napi_value argv[VBLK_MAX_ARGS];
  int fd;
  if (!vblk_args(env, info, "getSeals", 1, argv) || !vblk_arg_fd(env, argv[0], "getSeals", "fd", &fd)) return NULL;
  int seals = fcntl(fd, F_GET_SEALS);
  if (seals < 0) return vblk_throw_errno(env, "fcntl(F_GET_SEALS)", NULL, errno);
  return vblk_number(env, seals);
}

static napi_value js_fstat_size(napi_env env, napi_callback_info info) {
  napi_value argv[VBLK_MAX_ARGS];
  int fd;
  struct stat st;
  if (!vblk_args(env, info, "fstatSize", 1, argv) || !vblk_arg_fd(env, argv[0], "fstatSize", "fd", &fd)) return NULL;
  if (fstat(fd, &st) < 0) return vblk_throw_errno(env, "fstat", NULL, errno);
  return vblk_number(env, (double)st.st_size);
}

static napi_value js_close(napi_env env, napi_callback_info info) {
  napi_value argv[VBLK_MAX_ARGS];
  int fd;
  if (!vblk_args(env, info, "close", 1, argv) || !vblk_arg_fd(env, argv[0], "close", "fd", &fd)) return NULL;
  // On Linux the fd is released even when close reports EINTR: retrying could close
  // an fd another thread just opened, so EINTR counts as success.
  if (close(fd) < 0 && errno != EINTR) return vblk_throw_errno(env, "close", NULL, errno);
  return NULL;
}

// dup(fd) -> a new close-on-exec fd for the same open file.
static napi_value js_dup(napi_env env, napi_callback_info info) {
  napi_value argv[VBLK_MAX_ARGS];
  int fd;
  if (!vblk_args(env, info, "dup", 1, argv) || !vblk_arg_fd(env, argv[0], "dup", "fd", &fd)) return NULL;
  int copy = fcntl(fd, F_DUPFD_CLOEXEC, 0);
  if (copy < 0) return vblk_throw_errno(env, "fcntl(F_DUPFD_CLOEXEC)", NULL, errno);
  return vblk_number(env, copy);
}

// setNonBlocking(fd): for fds received from a peer, which may have been sent blocking.
static napi_value js_set_non_blocking(napi_env env, napi_callback_info info) {
  napi_value argv[VBLK_MAX_ARGS];
  int fd;
  if (!vblk_args(env, info, "setNonBlocking", 1, argv) || !vblk_arg_fd(env, argv[0], "setNonBlocking", "fd", &fd))
    return NULL;
  int flags = fcntl(fd, F_GETFL);
  if (flags < 0) return vblk_throw_errno(env, "fcntl(F_GETFL)", NULL, errno);
  if ((flags & O_NONBLOCK) == 0 && fcntl(fd, F_SETFL, flags | O_NONBLOCK) < 0)
    return vblk_throw_errno(env, "fcntl(F_SETFL)", NULL, errno);
  return NULL;
}

bool vblk_register_memory(napi_env env, napi_value exports) {
  static const vblk_function fns[] = {
      {"mmap", js_mmap},         {"munmap", js_munmap},         {"mappingCount", js_mapping_count},
      {"memfdCreate", js_memfd_create}, {"getSeals", js_get_seals}, {"fstatSize", js_fstat_size},
      {"close", js_close},       {"dup", js_dup},               {"setNonBlocking", js_set_non_blocking},
  };
  return vblk_export_functions(env, exports, fns, sizeof fns / sizeof fns[0]) &&
         vblk_export_number(env, exports, "PAGE_SIZE", (double)sysconf(_SC_PAGESIZE)) &&
         vblk_export_number(env, exports, "MMAP_MAX_LENGTH", (double)VBLK_MMAP_MAX_LENGTH) &&
         vblk_export_number(env, exports, "F_SEAL_SEAL", F_SEAL_SEAL) &&
         vblk_export_number(env, exports, "F_SEAL_SHRINK", F_SEAL_SHRINK) &&
         vblk_export_number(env, exports, "F_SEAL_GROW", F_SEAL_GROW);
}
