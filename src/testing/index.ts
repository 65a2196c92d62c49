/**
 * `vblk/testing`: what a backend's author tests it with. The loopback harness puts a
 * backend behind the real device and driver in one process; the backend compliance
 * suite (which every built-in backend passes) checks the BlockBackend contract with
 * `node:test`.
 */
export { openLoopbackDisk, type LoopbackDisk, type LoopbackDiskOptions } from './loopback.js';
