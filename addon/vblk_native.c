// vblk's native addon: the few syscalls Node.js does not offer (fd passing, mmap,
// memfd, eventfd, fd readiness on the event loop, vectored file I/O, OFD file locks).
// Only syscalls and argument checks live here; everything with policy lives in TypeScript
// (src/node/native.ts and the adapters next to it).
#include "common.h"

static napi_value init(napi_env env, napi_value exports) {
  if (!vblk_register_socket(env, exports) || !vblk_register_memory(env, exports) ||
      !vblk_register_eventfd(env, exports) || !vblk_register_watch(env, exports) ||
      !vblk_register_fileio(env, exports) || !vblk_register_mapfile(env, exports) ||
      !vblk_register_filelock(env, exports))
    return NULL;
  return exports;
}

NAPI_MODULE(NODE_GYP_MODULE_NAME, init)
