{
  "targets": [
    {
      "target_name": "vblk_native",
      "sources": [
        "addon/vblk_native.c",
        "addon/common.c",
        "addon/socket.c",
        "addon/memory.c",
        "addon/eventfd.c",
        "addon/watch.c",
        "addon/fileio.c",
        "addon/mapfile.c",
        "addon/filelock.c"
      ],
      "cflags": ["-std=gnu11", "-Wall", "-Wextra", "-Werror=implicit-function-declaration", "-fstack-protector-strong", "-D_FORTIFY_SOURCE=2", "-O2"],
      "defines": ["NAPI_VERSION=8"]
    }
  ]
}
