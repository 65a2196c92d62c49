/**
 * `vblk`: the core, which runs in a browser unchanged (it imports nothing from Node.js;
 * test/layering.test.ts holds it to that). The virtio-blk driver and device, the
 * loopback transport that joins them in one process, the {@link BlockBackend} interface
 * a storage implements with the helpers backends share, the memory backend, the errors,
 * and the spec constants callers need. Node.js adds `vblk/node` (serving a backend over
 * vhost-user, connecting to one, the file backend); tests add `vblk/testing`.
 */
export { VblkError, UsageError } from './errors.js';

export {
  BackendError, checkDiskSize, checkGrow, checkRange, totalLength, NO_MAXIMUM_BLOCK_SIZE,
  type BackendConcurrency, type BackendErrorCode, type BackendResult, type BlockBackend, type BlockSizeHints, type Extent,
} from './backends/backend.js';
export { MemoryBackend, MEMORY_CHUNK_SIZE, type MemoryBackendOptions } from './backends/memory-backend.js';
export * from './backends/filters/index.js';
export { openQcow2, Qcow2Backend, type Decompressor, type Qcow2Options } from './backends/qcow2/qcow2.js';
export { MemoryImageFile, type MemoryImageFileOptions } from './backends/qcow2/memory-image-file.js';
export type { ImageFile } from './backends/qcow2/image-file.js';
export { createQcow2, Qcow2CreateError, type Qcow2CreateOptions } from './backends/qcow2/create.js';
export { checkQcow2, type Qcow2CheckOptions, type Qcow2CheckResult } from './backends/qcow2/check.js';
export { repairQcow2, type Qcow2RepairResult } from './backends/qcow2/repair.js';
export {
  Qcow2Error, parseHeader, serializeHeader, QCOW2_MAGIC, INCOMPAT, COMPAT, AUTOCLEAR, COMPRESSION_TYPE, EXT,
  type CompressionType, type HeaderExtension, type Qcow2ErrorCode, type Qcow2Header,
} from './backends/qcow2/header.js';

export { BlkDevice, MAX_RANGE_SEGMENTS, type BlkDeviceOptions, type BlkRangeLimits } from './blk/device.js';
export {
  BlkDriver, DEFAULT_RECONNECT_TIMEOUT_MS, silentLogger,
  type BlkDriverOptions, type BlkLogger, type CacheMode, type Completion, type RequestOptions, type ResizeEvent, type SectorRange,
} from './blk/driver.js';
export {
  IoError, NotSupportedError, ProbeError, QueueBrokenError, ReadOnlyError, RequestError, TimeoutError,
  type ProbeErrorCode, type RequestErrorCode,
} from './blk/driver-errors.js';
export type { BlkConfig, BlkGeometry, BlkTopology } from './blk/config.js';
export type { QueueStats, QueueStatsSnapshot } from './blk/stats.js';
export type { ExtentKind } from './backends/backend.js';

export { LoopbackTransport, type LoopbackOptions } from './transport/loopback.js';
export type { DeviceHost, DriverQueueBinding, DriverTransport, VirtioDevice } from './virtqueue/device.js';

export {
  VIRTIO_BLK_F, VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S, VIRTIO_BLK_SECTOR_SIZE, VIRTIO_BLK_T,
} from './spec/virtio-blk.js';
export { VIRTIO_F } from './spec/virtio.js';
