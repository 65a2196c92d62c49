/**
 * Device status and feature negotiation (VIRTIO 1.2, 2.1 and 3.1.1) as a state machine,
 * for device-side transports that receive the driver's status writes. Illegal steps are
 * refused with a typed error; the caller decides whether that means FAILED.
 */
import { VblkError } from '../errors.js';
import { VIRTIO_CONFIG_S as S, VIRTIO_F, hasFeature } from '../spec/virtio.js';

export type StatusErrorCode = 'ILLEGAL_STATUS' | 'FEATURES_LOCKED' | 'FEATURES_NOT_OFFERED';

export class StatusError extends VblkError {
  declare readonly code: StatusErrorCode;
  constructor(code: StatusErrorCode, message: string) {
    super(code, message);
  }
}

export class StatusMachine {
  private statusBits = 0;
  private driverFeatures = 0n;

  constructor(readonly offered: bigint) {}

  get status(): number {
    return this.statusBits;
  }

  /** Features the driver accepted (meaningful once FEATURES_OK is set). */
  get negotiated(): bigint {
    return this.driverFeatures;
  }

  get isDriverOk(): boolean {
    return (this.statusBits & S.DRIVER_OK) !== 0 && (this.statusBits & S.FAILED) === 0;
  }

  /** Writing 0 resets (2.1.2); anything else may only add bits, in the order of 3.1.1. */
  write(next: number): StatusError | null {
    if (next === 0) {
      this.statusBits = 0;
      this.driverFeatures = 0n;
      return null;
    }
    const cur = this.statusBits;
    // 2.1.1: "The driver MUST NOT clear a device status bit."
    if ((cur & ~next & 0xff) !== 0) return illegal(`status 0x${next.toString(16)} clears bits of 0x${cur.toString(16)}`);
    const added = next & ~cur;
    const has = (bit: number): boolean => (next & bit) !== 0;
    if (has(S.DRIVER) && !has(S.ACKNOWLEDGE)) return illegal('DRIVER set without ACKNOWLEDGE');
    if (has(S.FEATURES_OK) && !has(S.DRIVER)) return illegal('FEATURES_OK set without DRIVER');
    if (added & S.FEATURES_OK && hasFeature(this.driverFeatures, VIRTIO_F.RING_PACKED)) {
      return new StatusError('FEATURES_NOT_OFFERED', 'VIRTIO_F_RING_PACKED is not supported');
    }
    // A VERSION_1 device needs FEATURES_OK before DRIVER_OK (3.1.1 step 5 → 8).
    if (has(S.DRIVER_OK) && hasFeature(this.offered, VIRTIO_F.VERSION_1) && !has(S.FEATURES_OK)) {
      return illegal('DRIVER_OK set before FEATURES_OK');
    }
    if (has(S.DRIVER_OK) && !has(S.DRIVER)) return illegal('DRIVER_OK set without DRIVER');
    if (added & S.NEEDS_RESET) return illegal('NEEDS_RESET is set by the device, not the driver');
    this.statusBits = next;
    return null;
  }

  /** The driver writes its features: only between DRIVER and FEATURES_OK (3.1.1 step 4). */
  setFeatures(features: bigint): StatusError | null {
    if ((this.statusBits & S.DRIVER) === 0 || (this.statusBits & S.FEATURES_OK) !== 0) {
      return new StatusError('FEATURES_LOCKED', 'features can only be written after DRIVER and before FEATURES_OK');
    }
    if ((features & ~this.offered) !== 0n) {
      return new StatusError('FEATURES_NOT_OFFERED', `driver accepted features 0x${(features & ~this.offered).toString(16)} the device did not offer`);
    }
    this.driverFeatures = features;
    return null;
  }

  /** The device flags that it needs a reset (2.1.2); the driver sees it in the status. */
  markNeedsReset(): void {
    if (this.statusBits & S.DRIVER_OK) this.statusBits |= S.NEEDS_RESET;
  }
}

function illegal(why: string): StatusError {
  return new StatusError('ILLEGAL_STATUS', `illegal device status transition: ${why}`);
}
