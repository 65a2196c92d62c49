/**
 * The testing kit (vblk/testing): the backend compliance suite to run against any
 * BlockBackend under `node:test`, the loopback harness that serves a backend to
 * the driver in one process, and a clock that tests move by hand.
 */
export {
  backendComplianceSuite, COMPLIANCE_DISK_SIZE,
  type ComplianceFactory, type ComplianceOptions, type ComplianceReadOnly, type ComplianceSubject,
} from './backend-compliance.js';
export { openLoopbackDisk, type LoopbackDisk, type LoopbackDiskOptions } from './loopback.js';
export { ManualClock } from './manual-clock.js';
