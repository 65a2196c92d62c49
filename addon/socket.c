// AF_UNIX stream sockets with fd passing. Every socket is created non-blocking and
// close-on-exec, and every send/receive also passes MSG_DONTWAIT, so no call here can
// block the event loop even on an fd someone else made blocking.
#include "common.h"

#include <errno.h>
#include <stddef.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

// vhost-user never passes more than 8 fds in one message (VHOST_MEMORY_BASELINE_NREGIONS);
// refusing more on send keeps us inside every peer's limit.
#define VBLK_SEND_MAX_FDS 8
// The kernel's SCM_MAX_FD: the most fds one recvmsg can deliver. The control buffer is
// sized for all of them so that every fd the kernel installs is seen, kept or closed.
#define VBLK_RECV_CMSG_FDS 253

static bool unix_address(napi_env env, napi_value v, const char *fn, struct sockaddr_un *sa, socklen_t *salen,
                         char *path, size_t cap) {
  size_t len;
  memset(sa, 0, sizeof *sa);
  sa->sun_family = AF_UNIX;
  // sun_path holds 108 bytes including the terminating NUL.
  if (!vblk_arg_string(env, v, fn, "path", path, cap < sizeof sa->sun_path ? cap : sizeof sa->sun_path, &len))
    return false;
  if (len == 0) {
    vblk_throw_range(env, "%s: path must not be empty", fn);
    return false;
  }
  memcpy(sa->sun_path, path, len + 1);
  *salen = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + len + 1);
  return true;
}

static void close_keep_errno(int fd) {
  int saved = errno;
  close(fd);
  errno = saved;
}

static napi_value js_listen(napi_env env, napi_callback_info info) {
  napi_value argv[VBLK_MAX_ARGS];
  struct sockaddr_un sa;
  socklen_t salen;
  char path[sizeof sa.sun_path];
  uint64_t backlog;
  if (!vblk_args(env, info, "listen", 2, argv) ||
      !unix_address(env, argv[0], "listen", &sa, &salen, path, sizeof path) ||
      !vblk_arg_uint(env, argv[1], "listen", "backlog", 1, 65535, &backlog))
    return NULL;

  int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (fd < 0) return vblk_throw_errno(env, "socket", NULL, errno);
  // bind fails with EADDRINUSE for any existing path, live or stale: telling them
  // apart (connect and see ECONNREFUSED) is the caller's policy.
  if (bind(fd, (struct sockaddr *)&sa, salen) < 0) {
    close_keep_errno(fd);
    return vblk_throw_errno(env, "bind", path, errno);
  }
  if (listen(fd, (int)backlog) < 0) {
    close_keep_errno(fd);
    return vblk_throw_errno(env, "listen", path, errno);
  }
  return vblk_number(env, fd);
}

static napi_value js_accept(napi_env env, napi_callback_info info) {
  napi_value argv[VBLK_MAX_ARGS];
  int fd;
  if (!vblk_args(env, info, "accept", 1, argv) || !vblk_arg_fd(env, argv[0], "accept", "fd", &fd)) return NULL;
  for (;;) {
    int c = accept4(fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (c >= 0) return vblk_number(env, c);
    // ECONNABORTED: that peer gave up while queued; the next one may be waiting.
    if (errno == EINTR || errno == ECONNABORTED) continue;
    if (errno == EAGAIN || errno == EWOULDBLOCK) return vblk_number(env, -1);
    return vblk_throw_errno(env, "accept4", NULL, errno);
  }
}

static napi_value js_connect(napi_env env, napi_callback_info info) {
  napi_value argv[VBLK_MAX_ARGS];
  struct sockaddr_un sa;
  socklen_t salen;
  char path[sizeof sa.sun_path];
  if (!vblk_args(env, info, "connect", 1, argv) ||
      !unix_address(env, argv[0], "connect", &sa, &salen, path, sizeof path))
    return NULL;
  int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (fd < 0) return vblk_throw_errno(env, "socket", NULL, errno);
  // A non-blocking AF_UNIX connect completes at once or fails; EAGAIN means the
  // listener's backlog is full and the caller may retry later.
  if (connect(fd, (struct sockaddr *)&sa, salen) < 0) {
    close_keep_errno(fd);
    return vblk_throw_errno(env, "connect", path, errno);
  }
  return vblk_number(env, fd);
}

static napi_value js_socketpair(napi_env env, napi_callback_info info) {
  (void)info;
  int sv[2];
  if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, sv) < 0)
    return vblk_throw_errno(env, "socketpair", NULL, errno);
  napi_value arr;
  if (napi_create_array_with_length(env, 2, &arr) != napi_ok ||
      napi_set_element(env, arr, 0, vblk_number(env, sv[0])) != napi_ok ||
      napi_set_element(env, arr, 1, vblk_number(env, sv[1])) != napi_ok) {
    close(sv[0]);
    close(sv[1]);
    vblk_napi_failed(env, "socketpair result");
    return NULL;
  }
  return arr;
}

// sendmsg(fd, data, fds?) -> bytes sent (possibly fewer than data.length), or -1 when
// the socket buffer is full (EAGAIN). The fds ride on the first byte sent.
static napi_value js_sendmsg(napi_env env, napi_callback_info info) {
  napi_value argv[VBLK_MAX_ARGS];
  int fd;
  uint8_t *data;
  size_t len;
  int fds[VBLK_SEND_MAX_FDS];
  uint32_t nfds = 0;
  if (!vblk_args(env, info, "sendmsg", 2, argv) || !vblk_arg_fd(env, argv[0], "sendmsg", "fd", &fd) ||
      !vblk_arg_bytes(env, argv[1], "sendmsg", "data", &data, &len, NULL))
    return NULL;
  if (len == 0)
    return vblk_throw_range(env, "sendmsg: data must not be empty (fds need at least one byte to ride on)");
  if (!vblk_is_undefined(env, argv[2])) {
    if (!vblk_arg_array(env, argv[2], "sendmsg", "fds", &nfds)) return NULL;
    if (nfds > VBLK_SEND_MAX_FDS)
      return vblk_throw_range(env, "sendmsg: at most %d fds per message, got %u", VBLK_SEND_MAX_FDS, nfds);
    for (uint32_t i = 0; i < nfds; i++) {
      napi_value el;
      char name[16];
      snprintf(name, sizeof name, "fds[%u]", i);
      VBLK_NAPI(env, napi_get_element(env, argv[2], i, &el));
      if (!vblk_arg_fd(env, el, "sendmsg", name, &fds[i])) return NULL;
    }
  }

  struct iovec iov = {.iov_base = data, .iov_len = len};
  union {
    struct cmsghdr align;
    char buf[CMSG_SPACE(sizeof(int) * VBLK_SEND_MAX_FDS)];
  } control;
  struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1};
  if (nfds > 0) {
    memset(&control, 0, sizeof control);
    msg.msg_control = control.buf;
    msg.msg_controllen = CMSG_SPACE(sizeof(int) * nfds);
    struct cmsghdr *c = &control.align; // CMSG_FIRSTHDR of this buffer
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof(int) * nfds);
    memcpy(CMSG_DATA(c), fds, sizeof(int) * nfds);
  }
  for (;;) {
    // MSG_NOSIGNAL: a closed peer must be an EPIPE error, never a SIGPIPE.
    ssize_t n = sendmsg(fd, &msg, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (n >= 0) return vblk_number(env, (double)n);
    if (errno == EINTR) continue;
    if (errno == EAGAIN || errno == EWOULDBLOCK) return vblk_number(env, -1);
    return vblk_throw_errno(env, "sendmsg", NULL, errno);
  }
}

// recvmsg(fd, into, maxFds) -> { bytes, fds, truncatedFds }, or null when nothing is
// there (EAGAIN). bytes = 0 is end of stream. Receives at most into.length bytes, so a
// caller reading exactly one header never consumes (nor takes the fds of) the next
// message.
static napi_value js_recvmsg(napi_env env, napi_callback_info info) {
  napi_value argv[VBLK_MAX_ARGS];
  int fd;
  uint8_t *data;
  size_t len;
  uint64_t max_fds;
  if (!vblk_args(env, info, "recvmsg", 3, argv) || !vblk_arg_fd(env, argv[0], "recvmsg", "fd", &fd) ||
      !vblk_arg_bytes(env, argv[1], "recvmsg", "into", &data, &len, NULL) ||
      !vblk_arg_uint(env, argv[2], "recvmsg", "maxFds", 0, VBLK_RECV_CMSG_FDS, &max_fds))
    return NULL;
  // A zero-length read would return 0, which means end of stream.
  if (len == 0) return vblk_throw_range(env, "recvmsg: into must not be empty (0 bytes read means end of stream)");

  struct iovec iov = {.iov_base = data, .iov_len = len};
  union {
    struct cmsghdr align;
    char buf[CMSG_SPACE(sizeof(int) * VBLK_RECV_CMSG_FDS)];
  } control;
  struct msghdr msg;
  ssize_t n;
  for (;;) {
    memset(&msg, 0, sizeof msg);
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.buf;
    msg.msg_controllen = sizeof control.buf;
    n = recvmsg(fd, &msg, MSG_CMSG_CLOEXEC | MSG_DONTWAIT);
    if (n >= 0) break;
    if (errno == EINTR) continue;
    if (errno == EAGAIN || errno == EWOULDBLOCK) {
      napi_value null_v;
      VBLK_NAPI(env, napi_get_null(env, &null_v));
      return null_v;
    }
    return vblk_throw_errno(env, "recvmsg", NULL, errno);
  }

  // Collect every fd the kernel installed before touching JS, so that a failure while
  // building the result can still close them all.
  int kept[VBLK_RECV_CMSG_FDS];
  uint32_t nkept = 0;
  // MSG_CTRUNC: the kernel dropped (and released) fds that did not fit.
  bool truncated = (msg.msg_flags & MSG_CTRUNC) != 0;
  for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c != NULL; c = CMSG_NXTHDR(&msg, c)) {
    if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
    size_t count = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
    for (size_t i = 0; i < count; i++) {
      int rfd;
      memcpy(&rfd, CMSG_DATA(c) + i * sizeof(int), sizeof rfd);
      if (nkept < max_fds) {
        kept[nkept++] = rfd;
      } else {
        close(rfd);
        truncated = true;
      }
    }
  }

  napi_value result, fds_v, v;
  bool ok = napi_create_object(env, &result) == napi_ok && napi_create_array_with_length(env, nkept, &fds_v) == napi_ok;
  for (uint32_t i = 0; ok && i < nkept; i++)
    ok = (v = vblk_number(env, kept[i])) != NULL && napi_set_element(env, fds_v, i, v) == napi_ok;
  ok = ok && (v = vblk_number(env, (double)n)) != NULL && napi_set_named_property(env, result, "bytes", v) == napi_ok &&
       napi_set_named_property(env, result, "fds", fds_v) == napi_ok && (v = vblk_bool(env, truncated)) != NULL &&
       napi_set_named_property(env, result, "truncatedFds", v) == napi_ok;
  if (!ok) {
    for (uint32_t i = 0; i < nkept; i++) close(kept[i]);
    vblk_napi_failed(env, "recvmsg result");
    return NULL;
  }
  return result;
}

// socketError(fd) -> the socket's pending error (SO_ERROR) as an errno error, or null.
// Reading it clears it. libuv reports an error condition on a polled fd (POLLERR) as
// EBADF, which names neither the fd's real state nor the cause; this is the cause.
static napi_value js_socket_error(napi_env env, napi_callback_info info) {
  napi_value argv[VBLK_MAX_ARGS];
  int fd;
  if (!vblk_args(env, info, "socketError", 1, argv) || !vblk_arg_fd(env, argv[0], "socketError", "fd", &fd))
    return NULL;
  int err = 0;
  socklen_t len = sizeof err;
  if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len) < 0) return vblk_throw_errno(env, "getsockopt", "SO_ERROR", errno);
  if (err == 0) {
    napi_value null_v;
    VBLK_NAPI(env, napi_get_null(env, &null_v));
    return null_v;
  }
  return vblk_errno_error(env, "socket", NULL, err);
}

bool vblk_register_socket(napi_env env, napi_value exports) {
  static const vblk_function fns[] = {
      {"listen", js_listen},   {"accept", js_accept},   {"connect", js_connect},
      {"socketpair", js_socketpair}, {"sendmsg", js_sendmsg}, {"recvmsg", js_recvmsg},
      {"socketError", js_socket_error},
  };
  return vblk_export_functions(env, exports, fns, sizeof fns / sizeof fns[0]) &&
         vblk_export_number(env, exports, "SEND_MAX_FDS", VBLK_SEND_MAX_FDS) &&
         vblk_export_number(env, exports, "RECV_MAX_FDS", VBLK_RECV_CMSG_FDS);
}
