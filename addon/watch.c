// fd readiness on Node's own libuv loop (uv_poll). This is how the event loop learns
// that a kick/call eventfd or a vhost-user socket has something for us.
//
// Lifetimes: a watcher lives from watch() until uv_close completes. The JS handle is a
// separate small box (freed by the garbage collector) that points at the watcher while
// it is open; each side clears the other's pointer when it goes away, so neither a
// stop() on a closed watcher nor a collected handle can touch freed memory. An active
// watcher keeps its callback alive even when the JS handle is dropped, as Node's own
// handles do.
#include "common.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <uv.h>

typedef struct watcher watcher;

typedef struct {
  watcher *w; // NULL once the watcher is closing
} watch_box;

struct watcher {
  uv_poll_t poll; // first member: the uv handle pointer is the watcher pointer
  napi_env env;
  napi_ref callback;
  napi_async_context async_context;
  napi_async_cleanup_hook_handle cleanup_hook;
  bool cleanup_running; // closing because the environment shuts down
  watch_box *box;
  int fd;
};

static const napi_type_tag watch_tag = {0x76626c6b77617463ULL, 0x3e81a9d4c27f0b56ULL};

static void on_closed(uv_handle_t *handle) {
  watcher *w = (watcher *)handle;
  if (w->callback != NULL) napi_delete_reference(w->env, w->callback);
  if (w->async_context != NULL) napi_async_destroy(w->env, w->async_context);
  // Tells Node that the shutdown can proceed (only when the hook started this close).
  if (w->cleanup_running) napi_remove_async_cleanup_hook(w->cleanup_hook);
  free(w);
}

// Starts closing: no callback runs after this returns, even if an event for this
// iteration is still queued, because uv_close stops the poll at once.
static void begin_close(watcher *w) {
  if (w->box != NULL) w->box->w = NULL;
  w->box = NULL;
  uv_close((uv_handle_t *)&w->poll, on_closed);
}

// The environment (main thread or a worker) is shutting down with this watcher open.
static void on_env_cleanup(napi_async_cleanup_hook_handle handle, void *arg) {
  (void)handle;
  watcher *w = arg;
  w->cleanup_running = true;
  begin_close(w);
}

static void on_poll(uv_poll_t *handle, int status, int events) {
  watcher *w = (watcher *)handle;
  napi_env env = w->env;
  napi_handle_scope scope;
  if (napi_open_handle_scope(env, &scope) != napi_ok) return;
  napi_value cb, recv, argv[2], result;
  if (napi_get_reference_value(env, w->callback, &cb) == napi_ok && cb != NULL &&
      napi_get_global(env, &recv) == napi_ok && napi_create_int32(env, status, &argv[0]) == napi_ok &&
      napi_create_int32(env, events, &argv[1]) == napi_ok) {
    // napi_make_callback (not napi_call_function): runs queued microtasks and
    // process.nextTick callbacks afterwards, as for any callback from the loop. Its
    // receiver must be an object, hence the global.
    if (napi_make_callback(env, w->async_context, recv, cb, 2, argv, &result) != napi_ok) {
      bool pending = false;
      napi_value error;
      // A throwing callback is an uncaught exception, exactly as in a Node callback.
      if (napi_is_exception_pending(env, &pending) == napi_ok && pending &&
          napi_get_and_clear_last_exception(env, &error) == napi_ok)
        napi_fatal_exception(env, error);
    }
  }
  napi_close_handle_scope(env, scope);
}

static void box_finalize(napi_env env, void *data, void *hint) {
  (void)env;
  (void)hint;
  watch_box *box = data;
  if (box->w != NULL) box->w->box = NULL;
  free(box);
}

static bool arg_events(napi_env env, napi_value v, const char *fn, int *out) {
  uint64_t events;
  if (!vblk_arg_uint(env, v, fn, "events", 0, UV_READABLE | UV_WRITABLE, &events)) return false;
  *out = (int)events;
  return true;
}

// Returns the open watcher behind a handle, or NULL (nothing thrown) when it was
// stopped; throws and returns NULL when the value is not a handle at all.
static watcher *arg_watcher(napi_env env, napi_value v, const char *fn, bool *ok) {
  napi_valuetype t;
  bool tagged = false;
  *ok = false;
  VBLK_NAPI(env, napi_typeof(env, v, &t));
  if (t == napi_external) VBLK_NAPI(env, napi_check_object_type_tag(env, v, &watch_tag, &tagged));
  if (!tagged) {
    vblk_throw_type(env, "%s: handle must be a handle returned by watch()", fn);
    return NULL;
  }
  watch_box *box;
  VBLK_NAPI(env, napi_get_value_external(env, v, (void **)&box));
  *ok = true;
  return box->w;
}

static napi_value throw_uv(napi_env env, const char *call, int fd, int uv_err) {
  char detail[32];
  snprintf(detail, sizeof detail, "(fd %d)", fd);
  return vblk_throw_errno(env, call, detail, -uv_err); // libuv errors are -errno on Unix
}

// watch(fd, events, callback(status, events), ref) -> handle. events: 1 readable,
// 2 writable, 3 both, 0 created paused. libuv allows one watcher per fd per loop.
static napi_value js_watch(napi_env env, napi_callback_info info) {
  napi_value argv[VBLK_MAX_ARGS];
  int fd, events;
  bool ref;
  if (!vblk_args(env, info, "watch", 4, argv) || !vblk_arg_fd(env, argv[0], "watch", "fd", &fd) ||
      !arg_events(env, argv[1], "watch", &events) || !vblk_arg_function(env, argv[2], "watch", "callback") ||
      !vblk_arg_bool(env, argv[3], "watch", "ref", &ref))
    return NULL;

  uv_loop_t *loop;
  VBLK_NAPI(env, napi_get_uv_event_loop(env, &loop));
  watcher *w = calloc(1, sizeof *w);
  watch_box *box = calloc(1, sizeof *box);
  if (w == NULL || box == NULL) {
    free(w);
    free(box);
    return vblk_throw_errno(env, "watch", NULL, ENOMEM);
  }
  w->env = env;
  w->fd = fd;
  // uv_poll_init also makes the fd non-blocking.
  int err = uv_poll_init(loop, &w->poll, fd);
  if (err < 0) {
    free(w);
    free(box);
    return throw_uv(env, "uv_poll_init", fd, err);
  }
  // From here on the watcher is a live libuv handle: every failure path closes it.
  napi_value resource_name, handle;
  bool ok = napi_create_reference(env, argv[2], 1, &w->callback) == napi_ok &&
            napi_create_string_utf8(env, "vblk:watch", NAPI_AUTO_LENGTH, &resource_name) == napi_ok &&
            napi_async_init(env, NULL, resource_name, &w->async_context) == napi_ok;
  if (ok && events != 0) {
    err = uv_poll_start(&w->poll, events, on_poll);
    if (err < 0) {
      uv_close((uv_handle_t *)&w->poll, on_closed);
      free(box);
      return throw_uv(env, "uv_poll_start", fd, err);
    }
  }
  ok = ok && napi_create_external(env, box, box_finalize, NULL, &handle) == napi_ok;
  if (!ok) {
    uv_close((uv_handle_t *)&w->poll, on_closed);
    free(box);
    vblk_napi_failed(env, "watch");
    return NULL;
  }
  // The box now belongs to the handle (box_finalize frees it).
  box->w = w;
  w->box = box;
  if (napi_type_tag_object(env, handle, &watch_tag) != napi_ok ||
      napi_add_async_cleanup_hook(env, on_env_cleanup, w, &w->cleanup_hook) != napi_ok) {
    begin_close(w);
    vblk_napi_failed(env, "watch");
    return NULL;
  }
  if (!ref) uv_unref((uv_handle_t *)&w->poll);
  return handle;
}

// watchSetEvents(handle, events): 0 pauses (the fd stays registered with this watcher).
static napi_value js_watch_set_events(napi_env env, napi_callback_info info) {
  napi_value argv[VBLK_MAX_ARGS];
  int events;
  bool ok;
  if (!vblk_args(env, info, "watchSetEvents", 2, argv)) return NULL;
  watcher *w = arg_watcher(env, argv[0], "watchSetEvents", &ok);
  if (!ok || !arg_events(env, argv[1], "watchSetEvents", &events)) return NULL;
  if (w == NULL) return vblk_throw_code(env, "ERR_VBLK_STOPPED", "watchSetEvents: the watcher was stopped");
  int err = events == 0 ? uv_poll_stop(&w->poll) : uv_poll_start(&w->poll, events, on_poll);
  if (err < 0) return throw_uv(env, events == 0 ? "uv_poll_stop" : "uv_poll_start", w->fd, err);
  return NULL;
}

// watchStop(handle): idempotent, safe inside the watcher's own callback. The handle no
// longer keeps the loop alive once this returns.
static napi_value js_watch_stop(napi_env env, napi_callback_info info) {
  napi_value argv[VBLK_MAX_ARGS];
  bool ok;
  if (!vblk_args(env, info, "watchStop", 1, argv)) return NULL;
  watcher *w = arg_watcher(env, argv[0], "watchStop", &ok);
  if (!ok || w == NULL) return NULL;
  // Removing the hook first: this close is ours, Node's shutdown need not wait for it.
  napi_remove_async_cleanup_hook(w->cleanup_hook);
  begin_close(w);
  return NULL;
}

// watchRef(handle, ref): whether an active watcher keeps the event loop alive.
static napi_value js_watch_ref(napi_env env, napi_callback_info info) {
  napi_value argv[VBLK_MAX_ARGS];
  bool ok, ref;
  if (!vblk_args(env, info, "watchRef", 2, argv)) return NULL;
  watcher *w = arg_watcher(env, argv[0], "watchRef", &ok);
  if (!ok || !vblk_arg_bool(env, argv[1], "watchRef", "ref", &ref)) return NULL;
  if (w == NULL) return vblk_throw_code(env, "ERR_VBLK_STOPPED", "watchRef: the watcher was stopped");
  if (ref)
    uv_ref((uv_handle_t *)&w->poll);
  else
    uv_unref((uv_handle_t *)&w->poll);
  return NULL;
}

bool vblk_register_watch(napi_env env, napi_value exports) {
  static const vblk_function fns[] = {
      {"watch", js_watch},
      {"watchSetEvents", js_watch_set_events},
      {"watchStop", js_watch_stop},
      {"watchRef", js_watch_ref},
  };
  return vblk_export_functions(env, exports, fns, sizeof fns / sizeof fns[0]) &&
         vblk_export_number(env, exports, "READABLE", UV_READABLE) &&
         vblk_export_number(env, exports, "WRITABLE", UV_WRITABLE);
}
