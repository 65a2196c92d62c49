/**
 * vhost-user protocol facts, as QEMU's `docs/interop/vhost-user.rst` states them (the
 * normative text) and as QEMU 7.2 and libvhost-user behave (`VHOST-USER-NOTES.md`).
 * Request objects follow the convention of `virtio.ts`: object name + key is the spec's
 * name, so `VHOST_USER.SET_MEM_TABLE` is `VHOST_USER_SET_MEM_TABLE` and
 * `VHOST_USER_PROTOCOL_F.CONFIG` is `VHOST_USER_PROTOCOL_F_CONFIG`. Names that older
 * versions of the spec gave the back-end channel appear under their current names.
 *
 * Every number on the wire is little-endian (the spec says "machine native"; vblk, QEMU
 * and every peer we talk to are little-endian hosts).
 */

/** A field of a wire struct: byte offset from the start of the struct, width in bytes. */
export interface WireField<W extends number = number> {
  readonly offset: number;
  readonly size: W;
}

/** A wire struct declared once: its fixed size and its fields (padding included). */
export interface WireStruct {
  readonly size: number;
  readonly fields: Readonly<Record<string, WireField>>;
}

// ---------------------------------------------------------------------------------------
// Header ("Message Specification" → "Header")

/** Every message starts with this 12-byte header: u32 request, u32 flags, u32 size. */
export const VHOST_USER_HEADER = {
  size: 12,
  fields: {
    request: { offset: 0, size: 4 },
    flags: { offset: 4, size: 4 },
    size: { offset: 8, size: 4 },
  },
} as const satisfies WireStruct;

/** Bytes in a message header. */
export const VHOST_USER_HEADER_SIZE = VHOST_USER_HEADER.size;

/** flags bits 0-1: the protocol version. */
export const VHOST_USER_VERSION_MASK = 0x3;
/** The only protocol version there is ("currently 0x01"). */
export const VHOST_USER_VERSION = 0x1;
/** flags bit 2: set on every reply (and only on replies). */
export const VHOST_USER_REPLY_MASK = 0x4;
/** flags bit 3: the sender asks for a REPLY_ACK ("VHOST_USER_PROTOCOL_F_REPLY_ACK"). */
export const VHOST_USER_NEED_REPLY_MASK = 0x8;

// ---------------------------------------------------------------------------------------
// Request numbers

/**
 * Front-end → back-end request numbers ("Front-end message types"), as QEMU 7.2 knows
 * them. Replies carry the same number back.
 */
export const VHOST_USER = {
  GET_FEATURES: 1,
  SET_FEATURES: 2,
  SET_OWNER: 3,
  RESET_OWNER: 4,
  SET_MEM_TABLE: 5,
  SET_LOG_BASE: 6,
  SET_LOG_FD: 7,
  SET_VRING_NUM: 8,
  SET_VRING_ADDR: 9,
  SET_VRING_BASE: 10,
  GET_VRING_BASE: 11,
  SET_VRING_KICK: 12,
  SET_VRING_CALL: 13,
  SET_VRING_ERR: 14,
  GET_PROTOCOL_FEATURES: 15,
  SET_PROTOCOL_FEATURES: 16,
  GET_QUEUE_NUM: 17,
  SET_VRING_ENABLE: 18,
  SEND_RARP: 19,
  NET_SET_MTU: 20,
  SET_BACKEND_REQ_FD: 21,
  IOTLB_MSG: 22,
  SET_VRING_ENDIAN: 23,
  GET_CONFIG: 24,
  SET_CONFIG: 25,
  CREATE_CRYPTO_SESSION: 26,
  CLOSE_CRYPTO_SESSION: 27,
  POSTCOPY_ADVISE: 28,
  POSTCOPY_LISTEN: 29,
  POSTCOPY_END: 30,
  GET_INFLIGHT_FD: 31,
  SET_INFLIGHT_FD: 32,
  GPU_SET_SOCKET: 33,
  RESET_DEVICE: 34,
  VRING_KICK: 35,
  GET_MAX_MEM_SLOTS: 36,
  ADD_MEM_REG: 37,
  REM_MEM_REG: 38,
  SET_STATUS: 39,
  GET_STATUS: 40,
} as const;

/** A front-end request by name (`VHOST_USER_<name>` in the spec). */
export type VhostUserRequestName = keyof typeof VHOST_USER;
/** A front-end request number. */
export type VhostUserRequestNumber = (typeof VHOST_USER)[VhostUserRequestName];

/**
 * Back-end → front-end request numbers, sent on the back-end channel that the front-end
 * hands over with `VHOST_USER_SET_BACKEND_REQ_FD` ("Back-end message types").
 */
export const VHOST_USER_BACKEND = {
  IOTLB_MSG: 1,
  CONFIG_CHANGE_MSG: 2,
  VRING_HOST_NOTIFIER_MSG: 3,
  VRING_CALL: 4,
  VRING_ERR: 5,
} as const;

/** A back-end request by name (`VHOST_USER_BACKEND_<name>` in the spec). */
export type VhostUserBackendRequestName = keyof typeof VHOST_USER_BACKEND;
/** A back-end request number. */
export type VhostUserBackendRequestNumber = (typeof VHOST_USER_BACKEND)[VhostUserBackendRequestName];

// ---------------------------------------------------------------------------------------
// Feature bits ("Communication", "Protocol features")

/**
 * Virtio feature bit 30 (reserved by VIRTIO as UNUSED) in GET_FEATURES/SET_FEATURES:
 * the back-end speaks GET/SET_PROTOCOL_FEATURES. The guest never sees it.
 */
export const VHOST_USER_F_PROTOCOL_FEATURES = 30;

/** Virtio feature bit 26 (vhost): the back-end can log its writes for migration. */
export const VHOST_F_LOG_ALL = 26;

/** Protocol feature bit numbers, as negotiated by GET/SET_PROTOCOL_FEATURES. */
export const VHOST_USER_PROTOCOL_F = {
  MQ: 0,
  LOG_SHMFD: 1,
  RARP: 2,
  REPLY_ACK: 3,
  MTU: 4,
  BACKEND_REQ: 5,
  CROSS_ENDIAN: 6,
  CRYPTO_SESSION: 7,
  PAGEFAULT: 8,
  CONFIG: 9,
  BACKEND_SEND_FD: 10,
  HOST_NOTIFIER: 11,
  INFLIGHT_SHMFD: 12,
  RESET_DEVICE: 13,
  INBAND_NOTIFICATIONS: 14,
  CONFIGURE_MEM_SLOTS: 15,
  STATUS: 16,
} as const;

/** A protocol feature by name (`VHOST_USER_PROTOCOL_F_<name>` in the spec). */
export type VhostUserProtocolFeatureName = keyof typeof VHOST_USER_PROTOCOL_F;

// ---------------------------------------------------------------------------------------
// Payload facts

/**
 * SET_VRING_KICK/CALL/ERR carry a u64 whose bits 0-7 are the vring index…
 */
export const VHOST_USER_VRING_IDX_MASK = 0xff;
/** …and whose bit 8 says "no fd in the ancillary data" (poll instead). */
export const VHOST_USER_VRING_NOFD_MASK = 1 << 8;

/** SET_VRING_ADDR flags bit 0: log writes to the used ring ("Migration"). */
export const VHOST_VRING_F_LOG = 0;

/**
 * The dirty log ("Migration" → "Dirty log"): one bit per page of guest-physical memory,
 * bit `page % 8` of byte `page / 8` (the spec's `log_addr + page / 8`), where
 * `page = guest_address / VHOST_LOG_PAGE`.
 */
export const VHOST_LOG_PAGE = 0x1000;

/**
 * `flags` of a config space message ("Virtio device config space"): 0 for a write
 * the guest made, 1 for live migration (which may also write read-only fields).
 */
export const VHOST_SET_CONFIG_TYPE = {
  FRONTEND: 0,
  MIGRATION: 1,
} as const;

/** The inflight buffer's queue region version ("Inflight I/O tracking"); 0 = uninitialised. */
export const VHOST_USER_INFLIGHT_VERSION = 1;

// ---------------------------------------------------------------------------------------
// Limits

/**
 * Largest payload vblk accepts in either direction. The largest message either side
 * sends is SET_MEM_TABLE with 8 regions (264 bytes) or a 256-byte config message (268);
 * libvhost-user stops at 272. 4096 leaves room for requests we do not know, whose payload
 * must still be read to stay in step, while bounding what one message can make us buffer.
 */
export const VHOST_USER_MAX_PAYLOAD_SIZE = 4096;

/** Most fds one message may carry (libvhost-user's limit, and the spec's for the back-end channel). */
export const VHOST_USER_MAX_FDS = 8;

/** Most regions in one SET_MEM_TABLE (QEMU's VHOST_MEMORY_BASELINE_NREGIONS). */
export const VHOST_USER_MAX_MEM_REGIONS = 8;

/** Largest virtio config space a config message may address (VHOST_USER_MAX_CONFIG_SIZE). */
export const VHOST_USER_MAX_CONFIG_SIZE = 256;

// ---------------------------------------------------------------------------------------
// Payload structs ("Message Specification" → "Payload")

/** "A single 64-bit integer": features, vring files, REPLY_ACK, counts, status. */
export const VHOST_USER_U64 = {
  size: 8,
  fields: { u64: { offset: 0, size: 8 } },
} as const satisfies WireStruct;

/** "A vring state description": `{u32 index, u32 num}`. */
export const VHOST_USER_VRING_STATE = {
  size: 8,
  fields: {
    index: { offset: 0, size: 4 },
    num: { offset: 4, size: 4 },
  },
} as const satisfies WireStruct;

/**
 * "A vring address description". Mind the order: descriptor table, used ring, available
 * ring. The ring addresses are front-end virtual addresses (user addresses), `log` is a
 * guest-physical address.
 */
export const VHOST_USER_VRING_ADDR = {
  size: 40,
  fields: {
    index: { offset: 0, size: 4 },
    flags: { offset: 4, size: 4 },
    desc: { offset: 8, size: 8 },
    used: { offset: 16, size: 8 },
    avail: { offset: 24, size: 8 },
    log: { offset: 32, size: 8 },
  },
} as const satisfies WireStruct;

/** "Memory regions description": this 8-byte head, then `nregions` × {@link VHOST_USER_MEMORY_REGION}. */
export const VHOST_USER_MEMORY = {
  size: 8,
  fields: {
    nregions: { offset: 0, size: 4 },
    padding: { offset: 4, size: 4 },
  },
} as const satisfies WireStruct;

/** One memory region: guest-physical address, size, front-end user address, offset in the fd. */
export const VHOST_USER_MEMORY_REGION = {
  size: 32,
  fields: {
    guestAddress: { offset: 0, size: 8 },
    size: { offset: 8, size: 8 },
    userAddress: { offset: 16, size: 8 },
    mmapOffset: { offset: 24, size: 8 },
  },
} as const satisfies WireStruct;

/** "Single memory region description" (ADD_MEM_REG, REM_MEM_REG): 8 bytes of padding, then a region. */
export const VHOST_USER_MEM_REG = {
  size: 8 + VHOST_USER_MEMORY_REGION.size,
  fields: {
    padding: { offset: 0, size: 8 },
    region: { offset: 8, size: VHOST_USER_MEMORY_REGION.size },
  },
} as const satisfies WireStruct;

/**
 * "Log description" (SET_LOG_BASE). The spec's message table still says u64, but QEMU
 * sends this 16-byte struct.
 */
export const VHOST_USER_LOG = {
  size: 16,
  fields: {
    mmapSize: { offset: 0, size: 8 },
    mmapOffset: { offset: 8, size: 8 },
  },
} as const satisfies WireStruct;

/** "Virtio device config space": this 12-byte head, then `size` bytes of config space. */
export const VHOST_USER_CONFIG = {
  size: 12,
  fields: {
    offset: { offset: 0, size: 4 },
    size: { offset: 4, size: 4 },
    flags: { offset: 8, size: 4 },
  },
} as const satisfies WireStruct;

/** "Inflight description": two u64, two u16, padded to 8-byte alignment as QEMU's C struct is. */
export const VHOST_USER_INFLIGHT = {
  size: 24,
  fields: {
    mmapSize: { offset: 0, size: 8 },
    mmapOffset: { offset: 8, size: 8 },
    numQueues: { offset: 16, size: 2 },
    queueSize: { offset: 18, size: 2 },
    padding: { offset: 20, size: 4 },
  },
} as const satisfies WireStruct;

/**
 * Head of one queue's region in the inflight buffer, split virtqueue (`QueueRegionSplit`,
 * "Inflight I/O tracking"); `desc_num` × {@link VHOST_USER_INFLIGHT_DESC_STATE_SPLIT}
 * follow it. This lives in shared memory, not in a message.
 */
export const VHOST_USER_INFLIGHT_QUEUE_REGION_SPLIT = {
  size: 16,
  fields: {
    features: { offset: 0, size: 8 },
    version: { offset: 8, size: 2 },
    descNum: { offset: 10, size: 2 },
    lastBatchHead: { offset: 12, size: 2 },
    usedIdx: { offset: 14, size: 2 },
  },
} as const satisfies WireStruct;

/** One descriptor's state in an inflight queue region (`DescStateSplit`). */
export const VHOST_USER_INFLIGHT_DESC_STATE_SPLIT = {
  size: 16,
  fields: {
    inflight: { offset: 0, size: 1 },
    padding: { offset: 1, size: 5 },
    next: { offset: 6, size: 2 },
    counter: { offset: 8, size: 8 },
  },
} as const satisfies WireStruct;
