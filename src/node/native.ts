/**
 * The native addon (`addon/*.c`, built to `build/Release/vblk_native.node`): loader and
 * typed surface. These are the only syscalls vblk needs that Node.js does not offer:
 * AF_UNIX fd passing, mmap of shared memory, memfd, eventfd, fd readiness on the event
 * loop, and vectored file I/O straight into guest memory.
 *
 * Conventions of every function here:
 * - Arguments are checked; a wrong type throws a `TypeError` with code
 *   `ERR_INVALID_ARG_TYPE`, a value out of range a `RangeError` with `ERR_OUT_OF_RANGE`.
 * - A failing syscall throws a {@link NativeError}: `code` is the errno name
 *   (`'EBADF'`), `errno` the number, `syscall` the call, and the message reads like
 *   `recvmsg: Bad file descriptor (EBADF)`.
 * - "Would block" is a return value, never an exception, where the brief of the call
 *   says so (`accept`, `sendmsg`, `recvmsg`, `eventfdRead`, `tryPreadv`).
 * - Every fd created here is non-blocking and close-on-exec. No call blocks on a
 *   socket; the synchronous file calls block on the disk (use the `Async` variants on
 *   the libuv thread pool when that is not acceptable).
 *
 * Higher-level adapters sit next to this module: `FdWatcher` (fd-watcher.ts),
 * `EventFd` (eventfd.ts), `UnixSocketServer`/`UnixConnection` (unix-socket.ts) and
 * `MappedRegion` (mapped-memory.ts).
 */
import { existsSync } from 'node:fs';
import { createRequire } from 'node:module';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

/** An error from a failed syscall (or a refused operation) in the addon. */
export interface NativeError extends Error {
  /** errno name such as `'EAGAIN'`, or an `ERR_*` code for argument and state errors. */
  readonly code: string;
  /** The positive errno, for syscall failures. */
  readonly errno?: number;
  /** The failing call, for syscall failures. */
  readonly syscall?: string;
}

/** Whether `e` is an error carrying a string `code`, optionally a given one. */
export function isNativeError(e: unknown, code?: string): e is NativeError {
  if (!(e instanceof Error)) return false;
  const actual: unknown = (e as { code?: unknown }).code;
  return typeof actual === 'string' && (code === undefined || actual === code);
}

/** What {@link recvmsg} received. */
export interface RecvResult {
  /** Bytes received; 0 means the peer closed the stream. */
  readonly bytes: number;
  /** fds received with these bytes (close-on-exec), at most the `maxFds` asked for. */
  readonly fds: number[];
  /** Some fds were dropped: more arrived than `maxFds` (those were closed) or the kernel truncated the control data. */
  readonly truncatedFds: boolean;
}

/** A shared mapping made by {@link mmap}. */
export interface Mapping {
  /** External ArrayBuffer over the mapping; detached (0 bytes) once unmapped. */
  readonly buffer: ArrayBuffer;
  /** The mapping's virtual address in this process. */
  readonly address: bigint;
}

declare const fileMapBrand: unique symbol;
/** Opaque handle of a read-only file mapping made by {@link mapFile}. */
export type FileMap = { readonly [fileMapBrand]: true };

declare const watchHandleBrand: unique symbol;
/** Opaque handle of an fd watcher made by {@link watch}. */
export type WatchHandle = { readonly [watchHandleBrand]: true };

/** Callback of {@link watch}: `status` is 0 or a negative errno; `events` has {@link READABLE} / {@link WRITABLE} bits. */
export type WatchCallback = (status: number, events: number) => void;

/** The addon's exports, as built from addon/*.c. */
/** What F_OFD_GETLK says of a lock in the way. */
interface RawLockHolder {
  type: number;
  start: number;
  length: number;
  pid: number;
}

interface Binding {
  listen(path: string, backlog: number): number;
  accept(fd: number): number;
  connect(path: string): number;
  socketpair(): [number, number];
  sendmsg(fd: number, data: Uint8Array, fds?: readonly number[]): number;
  recvmsg(fd: number, into: Uint8Array, maxFds: number): RecvResult | null;
  socketError(fd: number): NativeError | null;
  mmap(fd: number, length: number, offset: number, writable: boolean): Mapping;
  munmap(buffer: ArrayBuffer): boolean;
  mappingCount(): number;
  memfdCreate(name: string, size: number, seal: boolean): number;
  getSeals(fd: number): number;
  fstatSize(fd: number): number;
  close(fd: number): void;
  dup(fd: number): number;
  setNonBlocking(fd: number): void;
  eventfd(initial?: number): number;
  eventfdRead(fd: number): number;
  eventfdWrite(fd: number, n?: number): void;
  watch(fd: number, events: number, callback: WatchCallback, ref: boolean): WatchHandle;
  watchSetEvents(handle: WatchHandle, events: number): void;
  watchStop(handle: WatchHandle): void;
  watchRef(handle: WatchHandle, ref: boolean): void;
  preadv(fd: number, buffers: readonly Uint8Array[], position: number): number;
  pwritev(fd: number, buffers: readonly Uint8Array[], position: number): number;
  tryPreadv(fd: number, buffers: readonly Uint8Array[], position: number): number;
  preadvAsync(fd: number, buffers: readonly Uint8Array[], position: number): Promise<number>;
  pwritevAsync(fd: number, buffers: readonly Uint8Array[], position: number): Promise<number>;
  fdatasync(fd: number): void;
  fdatasyncAsync(fd: number): Promise<void>;
  fallocate(fd: number, mode: number, offset: number, length: number): void;
  fallocateAsync(fd: number, mode: number, offset: number, length: number): Promise<void>;
  mapFile(fd: number, length: number): FileMap;
  mappedRead(map: FileMap, position: number, buffers: readonly Uint8Array[]): number;
  unmapFile(map: FileMap): void;
  ofdLock(fd: number, start: number, length: number, type: number): boolean;
  ofdTestLock(fd: number, start: number, length: number, type: number): RawLockHolder | null;
  readonly F_RDLCK: number;
  readonly F_WRLCK: number;
  readonly F_UNLCK: number;
  readonly SEND_MAX_FDS: number;
  readonly RECV_MAX_FDS: number;
  readonly PAGE_SIZE: number;
  readonly MMAP_MAX_LENGTH: number;
  readonly F_SEAL_SEAL: number;
  readonly F_SEAL_SHRINK: number;
  readonly F_SEAL_GROW: number;
  readonly READABLE: number;
  readonly WRITABLE: number;
  readonly FALLOC_FL_KEEP_SIZE: number;
  readonly FALLOC_FL_PUNCH_HOLE: number;
  readonly FALLOC_FL_ZERO_RANGE: number;
  readonly MAX_SEGMENTS: number;
}

const ADDON = join('build', 'Release', 'vblk_native.node');

/**
 * The package root: the nearest directory above this module with a package.json. The
 * module runs from dist/src/node/ (compiled) or src/node/ (sources), so the root is not
 * at a fixed depth.
 */
function packageRoot(): string {
  const here = dirname(fileURLToPath(import.meta.url));
  for (let dir = here; ; dir = dirname(dir)) {
    if (existsSync(join(dir, 'package.json'))) return dir;
    if (dirname(dir) === dir) return here;
  }
}

function load(): Binding {
  const path = join(packageRoot(), ADDON);
  let binding: Binding;
  try {
    binding = createRequire(import.meta.url)(path) as Binding;
  } catch (e) {
    const reason = e instanceof Error ? e.message.split('\n')[0] : String(e);
    throw new Error(
      `vblk: cannot load its native addon ${path} (${reason}). ` +
        'Build it with `npm rebuild vblk` where vblk is installed (in its own repository: `npm run install`); ' +
        'building needs python3, make, and C and C++ compilers.',
    );
  }
  // A build from older sources loads but lacks functions: say so now, not at first use.
  if (typeof binding.ofdLock !== 'function' || typeof binding.fallocateAsync !== 'function' || typeof binding.watchRef !== 'function' || typeof binding.socketError !== 'function') {
    throw new Error(`vblk: the native addon ${path} is out of date; rebuild it with \`npm rebuild vblk\` (in vblk's repository: \`npm run install\`).`);
  }
  return binding;
}

const binding = load();

// ---- constants ----

/** Most fds {@link sendmsg} passes in one message (vhost-user's limit). */
export const SEND_MAX_FDS: number = binding.SEND_MAX_FDS;
/** Most fds one {@link recvmsg} can deliver (the kernel's SCM_MAX_FD). */
export const RECV_MAX_FDS: number = binding.RECV_MAX_FDS;
/** The system page size: mmap offsets are multiples of it. */
export const PAGE_SIZE: number = binding.PAGE_SIZE;
/** Largest single {@link mmap}: Node 20's limit for an external ArrayBuffer (4 GiB). */
export const MMAP_MAX_LENGTH: number = binding.MMAP_MAX_LENGTH;
/** Most buffers one vectored I/O call accepts. */
export const MAX_SEGMENTS: number = binding.MAX_SEGMENTS;
/** memfd seals, as returned by {@link getSeals}. */
export const F_SEAL_SEAL: number = binding.F_SEAL_SEAL;
export const F_SEAL_SHRINK: number = binding.F_SEAL_SHRINK;
export const F_SEAL_GROW: number = binding.F_SEAL_GROW;
/** Event bits of {@link watch}. */
export const READABLE: number = binding.READABLE;
export const WRITABLE: number = binding.WRITABLE;
/** {@link fallocate} modes: PUNCH_HOLE must be combined with KEEP_SIZE. */
export const FALLOC_FL_KEEP_SIZE: number = binding.FALLOC_FL_KEEP_SIZE;
export const FALLOC_FL_PUNCH_HOLE: number = binding.FALLOC_FL_PUNCH_HOLE;
export const FALLOC_FL_ZERO_RANGE: number = binding.FALLOC_FL_ZERO_RANGE;

// ---- AF_UNIX sockets ----

/**
 * Creates a listening AF_UNIX stream socket bound to `path`. Throws `EADDRINUSE` when
 * anything exists at `path`, live socket or stale one: telling those apart is the
 * caller's policy (see `UnixSocketServer`).
 */
export function listen(path: string, backlog = 16): number {
  return binding.listen(path, backlog);
}

/** Accepts one connection: its fd, or -1 when none is waiting. */
export const accept: (fd: number) => number = binding.accept;

/**
 * Connects to the AF_UNIX stream socket at `path` and returns the connected fd. An
 * AF_UNIX connect completes at once; `EAGAIN` means the listener's backlog is full
 * (retry later), `ECONNREFUSED` that nobody listens, `ENOENT` that nothing is there.
 */
export const connect: (path: string) => number = binding.connect;

/** A connected pair of AF_UNIX stream sockets (for tests and in-process peers). */
export const socketpair: () => [number, number] = binding.socketpair;

/**
 * Sends `data` with `fds` attached (SCM_RIGHTS, at most {@link SEND_MAX_FDS}) in one
 * sendmsg. Returns the bytes sent, which may be fewer than `data.length` (the fds went
 * with the first byte; send the rest without them), or -1 when the socket buffer is
 * full and nothing was sent. `data` must not be empty. The caller keeps its fds.
 */
export function sendmsg(fd: number, data: Uint8Array, fds: readonly number[] = []): number {
  return binding.sendmsg(fd, data, fds);
}

/**
 * Receives at most `into.length` bytes (never more: a caller reading exactly one
 * message header cannot consume the next message or its fds) with up to `maxFds`
 * passed fds. Returns null when nothing is there yet; `bytes` 0 means the peer closed.
 * Received fds are close-on-exec and owned by the caller; extra ones are closed and
 * flagged in `truncatedFds`.
 */
export const recvmsg: (fd: number, into: Uint8Array, maxFds: number) => RecvResult | null = binding.recvmsg;

/**
 * The socket's pending error (SO_ERROR), which reading clears, or null when it has none:
 * what an error condition reported while polling it really was (libuv reports any as
 * EBADF). `ECONNRESET` on an AF_UNIX stream socket: the peer closed it with data of ours
 * unread. Throws `ENOTSOCK` for an fd that is not a socket.
 */
export const socketError: (fd: number) => NativeError | null = binding.socketError;

// ---- shared memory and plain fds ----

/**
 * Maps `length` bytes of `fd` from `offset` (a multiple of {@link PAGE_SIZE}) shared,
 * read-only or read-write. At most {@link MMAP_MAX_LENGTH} bytes: map larger regions as
 * several windows (`MappedRegion` does). A range beyond the end of a regular file is
 * refused: touching it would kill the process with SIGBUS.
 *
 * The mapping lives until {@link munmap}, or until the buffer is garbage collected.
 */
export const mmap: (fd: number, length: number, offset: number, writable: boolean) => Mapping = binding.mmap;

/**
 * Unmaps a buffer from {@link mmap}: detaches it first, so every view of it reads as
 * empty afterwards instead of faulting. Returns true when it unmapped, false when the
 * buffer was already unmapped. Throws `ERR_INVALID_ARG_TYPE` for a buffer that is not
 * from {@link mmap}, and `EBUSY` while an asynchronous I/O request uses the mapping.
 */
export const munmap: (buffer: ArrayBuffer) => boolean = binding.munmap;

/** How many mappings from {@link mmap} are alive in this process (diagnostics, leak tests). */
export const mappingCount: () => number = binding.mappingCount;

/** Options of {@link memfdCreate}. */
export interface MemfdOptions {
  /** Seal the size (F_SEAL_SHRINK, F_SEAL_GROW) and the seals (F_SEAL_SEAL), so no peer can shrink it under a mapping. */
  readonly seal?: boolean;
}

/** Creates an anonymous shared-memory file of `size` bytes (zeroed, close-on-exec, sealable). */
export function memfdCreate(name: string, size: number, options: MemfdOptions = {}): number {
  return binding.memfdCreate(name, size, options.seal ?? false);
}

/** The seals of a memfd ({@link F_SEAL_SEAL} etc.). */
export const getSeals: (fd: number) => number = binding.getSeals;

/** The fd's file size (st_size). */
export const fstatSize: (fd: number) => number = binding.fstatSize;

/** Closes an fd. */
export const close: (fd: number) => void = binding.close;

/** A close-on-exec duplicate of `fd`. */
export const dup: (fd: number) => number = binding.dup;

/** Sets O_NONBLOCK on an fd received from a peer (which may have sent it blocking). */
export const setNonBlocking: (fd: number) => void = binding.setNonBlocking;

// ---- eventfd ----

/** Creates a non-blocking, close-on-exec eventfd with the given initial count. */
export function eventfd(initial = 0): number {
  return binding.eventfd(initial);
}

/**
 * Reads and resets the count: what was written since the last read (writes coalesce),
 * 0 when nothing was. Counts above 2^53 lose precision. Throws `EINVAL` when the fd
 * turns out not to be an eventfd.
 */
export const eventfdRead: (fd: number) => number = binding.eventfdRead;

/** Adds `n` (default 1) to the count, waking whoever watches the fd. */
export function eventfdWrite(fd: number, n = 1): void {
  binding.eventfdWrite(fd, n);
}

// ---- fd readiness ----

/**
 * Watches `fd` on Node's event loop (libuv uv_poll, level-triggered): `callback(status,
 * events)` runs whenever the fd is readable (`events` 1 = {@link READABLE}) and/or
 * writable (2 = {@link WRITABLE}); 0 starts paused. Only one watcher per fd. A `ref`
 * watcher keeps the process alive while active. Makes the fd non-blocking. A throwing
 * callback is an uncaught exception. Stop the watcher before closing the fd.
 */
export const watch: (fd: number, events: number, callback: WatchCallback, ref: boolean) => WatchHandle = binding.watch;

/** Changes what a watcher waits for; 0 pauses it (a paused watcher does not keep the loop alive). */
export const watchSetEvents: (handle: WatchHandle, events: number) => void = binding.watchSetEvents;

/** Stops a watcher for good (idempotent; allowed inside its own callback; no callback runs after it). */
export const watchStop: (handle: WatchHandle) => void = binding.watchStop;

/** Whether an active watcher keeps the event loop alive. */
export const watchRef: (handle: WatchHandle, ref: boolean) => void = binding.watchRef;

// ---- file I/O ----

/**
 * Reads into `buffers` in order from file offset `position`, looping over short
 * counts; returns the bytes read, fewer than asked only at end of file. Blocks on the
 * disk: see {@link preadvAsync}. At most {@link MAX_SEGMENTS} buffers; empty ones are
 * skipped; a detached one throws `ERR_VBLK_DETACHED`.
 */
export const preadv: (fd: number, buffers: readonly Uint8Array[], position: number) => number = binding.preadv;

/** Writes `buffers` in order at `position`, looping over short counts; returns the bytes written (all of them) or throws. */
export const pwritev: (fd: number, buffers: readonly Uint8Array[], position: number) => number = binding.pwritev;

/**
 * One non-blocking read attempt (preadv2 with RWF_NOWAIT): the bytes that were in the
 * page cache (possibly fewer than asked; 0 at end of file), or -1 when reading would
 * wait for the disk. Throws `EOPNOTSUPP` where the filesystem cannot do this.
 */
export const tryPreadv: (fd: number, buffers: readonly Uint8Array[], position: number) => number = binding.tryPreadv;

/**
 * {@link preadv} on the libuv thread pool. The buffers are kept alive, and the mappings
 * they lie in pinned ({@link munmap} throws `EBUSY`), until the promise settles; do not
 * transfer them meanwhile.
 */
export const preadvAsync: (fd: number, buffers: readonly Uint8Array[], position: number) => Promise<number> =
  binding.preadvAsync;

/** {@link pwritev} on the libuv thread pool (buffers kept alive and pinned as for {@link preadvAsync}). */
export const pwritevAsync: (fd: number, buffers: readonly Uint8Array[], position: number) => Promise<number> =
  binding.pwritevAsync;

/**
 * Maps the first `length` bytes of the file `fd` read-only and shared (MAP_NORESERVE:
 * a sparse terabyte costs address space only). Unmapped by {@link unmapFile}, or when
 * the handle is garbage collected.
 */
export const mapFile: (fd: number, length: number) => FileMap = binding.mapFile;

/**
 * Copies from the mapping at `position` into `buffers` in order; returns the bytes
 * copied, fewer than asked only at the end of the mapping. No syscall: a page in the
 * page cache costs a memcpy; one that is not blocks for the disk. A page that cannot be
 * read (an I/O error, the file truncated under the mapping) throws `EIO` instead of
 * killing the process with SIGBUS. Throws `ERR_VBLK_UNMAPPED` after {@link unmapFile}.
 */
export const mappedRead: (map: FileMap, position: number, buffers: readonly Uint8Array[]) => number = binding.mappedRead;

/** Unmaps now (idempotent); later {@link mappedRead}s throw. */
export const unmapFile: (map: FileMap) => void = binding.unmapFile;

/** Flushes the file's data (and the metadata needed to read it back) to stable storage. */
export const fdatasync: (fd: number) => void = binding.fdatasync;

/** {@link fdatasync} on the libuv thread pool. */
export const fdatasyncAsync: (fd: number) => Promise<void> = binding.fdatasyncAsync;

/**
 * fallocate(2) with `mode` a combination of {@link FALLOC_FL_KEEP_SIZE},
 * {@link FALLOC_FL_PUNCH_HOLE} (needs KEEP_SIZE) and {@link FALLOC_FL_ZERO_RANGE}.
 * Unsupported modes fail with code `EOPNOTSUPP` (or `EINVAL`): fall back to writing zeroes.
 */
export const fallocate: (fd: number, mode: number, offset: number, length: number) => void = binding.fallocate;

/** {@link fallocate} on the libuv thread pool. */
export const fallocateAsync: (fd: number, mode: number, offset: number, length: number) => Promise<void> =
  binding.fallocateAsync;

/** A byte-range lock's kind: shared (`read`) or exclusive (`write`). */
export type LockKind = 'read' | 'write';

/** A lock in the way of another, as F_OFD_GETLK reports one of them. */
export interface LockHolder {
  readonly kind: LockKind;
  /** First byte and length (0: to the end of the file and beyond). */
  readonly start: number;
  readonly length: number;
  /** The holder's process for a classic POSIX lock; null for an OFD lock, whose owner the kernel does not tell. */
  readonly pid: number | null;
}

/**
 * Sets an open-file-description lock on `length` bytes at `start` of the file `fd` is
 * open on (0 bytes: to the end and beyond), without waiting: true when set, false when
 * another open file holds a conflicting lock. QEMU locks image files this way; a `read`
 * lock needs `fd` open for reading, a `write` lock open for writing. The lock lasts until
 * {@link ofdUnlock} or until the last fd of this open file is closed.
 */
export function ofdLock(fd: number, start: number, length: number, kind: LockKind): boolean {
  return binding.ofdLock(fd, start, length, kind === 'read' ? binding.F_RDLCK : binding.F_WRLCK);
}

/** Removes this open file's locks on the range. */
export function ofdUnlock(fd: number, start: number, length: number): void {
  binding.ofdLock(fd, start, length, binding.F_UNLCK);
}

/**
 * Whether a lock of `kind` on the range could be set through `fd`: null when it could,
 * else one lock of another open file in the way. This open file's own locks never are.
 */
export function ofdTestLock(fd: number, start: number, length: number, kind: LockKind): LockHolder | null {
  const held = binding.ofdTestLock(fd, start, length, kind === 'read' ? binding.F_RDLCK : binding.F_WRLCK);
  if (held === null) return null;
  return { kind: held.type === binding.F_WRLCK ? 'write' : 'read', start: held.start, length: held.length, pid: held.pid > 0 ? held.pid : null };
}
