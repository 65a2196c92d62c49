/**
 * `vblk/node`: vblk on Node.js (Linux). Serve any `BlockBackend` to QEMU and
 * other vhost-user frontends ({@link serve}), drive a vhost-user-blk device
 * ({@link connect}), load a backend module as `vblk serve --backend` does
 * ({@link loadBackendModule}), the file backend for raw images, images with their
 * backing chains, raw or qcow2 ({@link openImage}), an NBD export as a backend
 * ({@link openNbdBackend}), and the image lock `vblk serve` takes ({@link lockImage}).
 * Needs the native addon, which `npm install` builds.
 */
export { serve, type ServeOptions, type ServedDisk, type ServedSocket } from './serve.js';
export { connect, type ConnectDiskOptions, type ConnectedDisk } from './connect.js';
export {
  BackendModuleError, loadBackendModule,
  type BackendFactory, type BackendModuleErrorCode, type LoadBackendOptions,
} from './backend-module.js';
export {
  FileBackend, FileBackendError, openFileBackend,
  type FileBackendErrorCode, type FileBackendOptions, type FileIoMode,
} from './file-backend.js';
export {
  ImageOpenError, MAX_BACKING_DEPTH, openImage,
  type BackingLevel, type FormatSource, type ImageFormat, type ImageOpenErrorCode, type OpenImageOptions, type OpenedImage,
} from './image-open.js';
export {
  NbdBackendError, openNbdBackend, type NbdBackendErrorCode, type NbdBackendOptions, type NbdExportBackend,
} from './nbd-backend.js';
export type { NbdBlockSizes, NbdExportInfo } from '../backends/nbd/handshake.js';
export type { NbdAddress, NbdScheme, NbdUri } from '../backends/nbd/uri.js';
export { ImageLockError, lockImage, type ImageLock, type ImageLockOptions } from './image-lock.js';
export { VhostUserServer, type VhostUserServerOptions } from './vhost-user-server.js';
export { connectVhostUser, type ConnectOptions } from './vhost-user-client.js';
export type { VhostUserFrontend } from '../transport/vhost-user/frontend.js';
export type { LogContext, LogSink } from '../log.js';
