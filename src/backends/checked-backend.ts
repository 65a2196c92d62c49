/**
 * A backend from code vblk does not control (a user's module behind `vblk serve
 * --backend`), checked before it is served and guarded while it is.
 *
 * The check reads every member the device relies on once, and refuses the object with
 * one line naming the first member that is missing or of the wrong kind; a getter that
 * throws is refused the same way. The guard then stands between the device and the
 * backend's methods: the device takes a method's result as "done" (undefined) or as a
 * promise, and would throw on anything else, outside the code that turns a backend's
 * failure into IOERR. A method that returns a value (the byte count of a `readvSync`,
 * say) has completed synchronously; one that returns an object is waited on as a
 * thenable, and a `then` that throws fails that request. Throwing and rejecting need no
 * guard: the device already fails the request and reports it.
 */
import { VblkError, describeThrown } from '../errors.js';
import { VIRTIO_BLK_SECTOR_SIZE } from '../spec/virtio-blk.js';
import type { BackendConcurrency, BackendResult, BlockBackend, BlockSizeHints, Extent } from './backend.js';

/** Why an object cannot be served as a {@link BlockBackend}. */
export class BackendShapeError extends VblkError {
  constructor(message: string) {
    super('NOT_A_BACKEND', message);
  }
}

const FLAGS = ['readOnly', 'canFlush', 'canDiscard', 'canWriteZeroes'] as const;
const METHODS = ['read', 'write', 'flush', 'discard', 'writeZeroes', 'close'] as const;

/** What `value` is, for a message: "a string", "null", "an array" … */
function kindOf(value: unknown): string {
  if (value === null) return 'null';
  if (Array.isArray(value)) return 'an array';
  const t = typeof value;
  return t === 'undefined' ? 'undefined' : t === 'object' ? 'an object' : `a ${t}`;
}

/** Reads `object[name]`; a getter that throws is a shape error, not an exception of its own kind. */
function member(object: object, name: string): unknown {
  try {
    return (object as Record<string, unknown>)[name];
  } catch (e) {
    throw new BackendShapeError(`reading the backend's ${name} threw: ${describeThrown(e)}`);
  }
}

/** A method's result as the device takes it: undefined when done, else a promise. */
function settled(result: unknown): BackendResult {
  if (result instanceof Promise) return result as Promise<void>;
  // Promise.resolve never throws: a `then` getter or call that throws rejects instead.
  if (result !== null && (typeof result === 'object' || typeof result === 'function')) {
    return Promise.resolve(result).then(() => undefined);
  }
  return undefined;
}

/** What the checks read once, besides the four capability flags. */
interface Checked {
  readonly hasResize: boolean;
  readonly hasExtents: boolean;
  readonly blockSize: BlockSizeHints | undefined;
  readonly concurrency: BackendConcurrency | undefined;
}

/**
 * The guard: the backend's own methods, their results made safe; the capabilities as
 * checked. It has no `open`: {@link openCheckedBackend} has opened the backend already.
 */
class CheckedBackend implements BlockBackend {
  readonly resize?: (newSize: number) => BackendResult;
  readonly extents?: (offset: number, length: number) => Promise<Extent[]>;
  readonly blockSize?: BlockSizeHints;
  readonly concurrency?: BackendConcurrency;

  constructor(
    private readonly inner: BlockBackend,
    readonly readOnly: boolean,
    readonly canFlush: boolean,
    readonly canDiscard: boolean,
    readonly canWriteZeroes: boolean,
    checked: Checked,
  ) {
    if (checked.hasResize) this.resize = (newSize) => settled(inner.resize?.(newSize));
    // A promise whatever the backend returns: its callers take either.
    if (checked.hasExtents) this.extents = async (offset, length) => (await inner.extents?.(offset, length)) ?? [];
    if (checked.blockSize !== undefined) this.blockSize = checked.blockSize;
    if (checked.concurrency !== undefined) this.concurrency = checked.concurrency;
  }

  get size(): number {
    return this.inner.size;
  }

  read(offset: number, buffers: readonly Uint8Array[]): BackendResult {
    return settled(this.inner.read(offset, buffers));
  }

  write(offset: number, buffers: readonly Uint8Array[]): BackendResult {
    return settled(this.inner.write(offset, buffers));
  }

  flush(): BackendResult {
    return settled(this.inner.flush());
  }

  discard(offset: number, length: number): BackendResult {
    return settled(this.inner.discard(offset, length));
  }

  writeZeroes(offset: number, length: number, unmap: boolean): BackendResult {
    return settled(this.inner.writeZeroes(offset, length, unmap));
  }

  close(): BackendResult {
    return settled(this.inner.close());
  }
}

/**
 * Opens `value` when it has an `open` step (a backend may learn its size and capabilities
 * there), then checks it as {@link checkBackend} does and returns it guarded. An `open`
 * that throws or rejects is refused with its reason.
 */
export async function openCheckedBackend(value: unknown): Promise<BlockBackend> {
  const object = asObject(value);
  const open = member(object, 'open');
  if (open !== undefined && typeof open !== 'function') throw new BackendShapeError(`the backend's open must be a method when present, got ${kindOf(open)}`);
  if (typeof open === 'function') {
    try {
      await settled((open as () => unknown).call(object));
    } catch (e) {
      throw new BackendShapeError(`the backend's open failed: ${describeThrown(e)}`);
    }
  }
  return checkOpened(object);
}

/**
 * Checks that `value` has the shape of a {@link BlockBackend} — a size that is a
 * positive safe multiple of 512, the four capability booleans, the six methods, and
 * `resize`, `extents`, `blockSize` and `concurrency` of the right kind when present — and
 * returns it guarded. Throws {@link BackendShapeError} with a one-line message otherwise.
 * A backend with an `open` step goes through {@link openCheckedBackend} instead.
 */
export function checkBackend(value: unknown): BlockBackend {
  const object = asObject(value);
  if (member(object, 'open') !== undefined) throw new BackendShapeError('the backend has an open step: check it with openCheckedBackend');
  return checkOpened(object);
}

function asObject(value: unknown): object {
  if (value === null || (typeof value !== 'object' && typeof value !== 'function')) {
    throw new BackendShapeError(`the backend is ${kindOf(value)}, not an object`);
  }
  return value;
}

function checkOpened(value: object): BlockBackend {
  const size = member(value, 'size');
  if (typeof size !== 'number' || !Number.isSafeInteger(size) || size < VIRTIO_BLK_SECTOR_SIZE || size % VIRTIO_BLK_SECTOR_SIZE !== 0) {
    const shown = typeof size === 'number' ? String(size) : kindOf(size);
    throw new BackendShapeError(`the backend's size must be a positive multiple of ${VIRTIO_BLK_SECTOR_SIZE} bytes, got ${shown}`);
  }
  const flags = FLAGS.map((name) => {
    const flag = member(value, name);
    if (typeof flag !== 'boolean') throw new BackendShapeError(`the backend's ${name} must be a boolean, got ${kindOf(flag)}`);
    return flag;
  });
  for (const name of METHODS) {
    const method = member(value, name);
    if (typeof method !== 'function') throw new BackendShapeError(`the backend's ${name} must be a method, got ${kindOf(method)}`);
  }
  const resize = member(value, 'resize');
  if (resize !== undefined && typeof resize !== 'function') {
    throw new BackendShapeError(`the backend's resize must be a method when present, got ${kindOf(resize)}`);
  }
  const extents = member(value, 'extents');
  if (extents !== undefined && typeof extents !== 'function') {
    throw new BackendShapeError(`the backend's extents must be a method when present, got ${kindOf(extents)}`);
  }
  const concurrency = member(value, 'concurrency');
  if (concurrency !== undefined && concurrency !== 'parallel' && concurrency !== 'serial') {
    const shown = typeof concurrency === 'string' ? `'${concurrency}'` : kindOf(concurrency);
    throw new BackendShapeError(`the backend's concurrency must be 'parallel' or 'serial' when present, got ${shown}`);
  }
  const blockSize = member(value, 'blockSize');
  let hints: BlockSizeHints | undefined;
  if (blockSize !== undefined) {
    if (blockSize === null || typeof blockSize !== 'object') throw new BackendShapeError(`the backend's blockSize must be an object when present, got ${kindOf(blockSize)}`);
    const field = (name: 'minimum' | 'preferred' | 'maximum'): number => {
      const v = member(blockSize, name);
      if (typeof v !== 'number') throw new BackendShapeError(`the backend's blockSize.${name} must be a number, got ${kindOf(v)}`);
      return v;
    };
    // A copy: the device validates the numbers, and a getter cannot change them later.
    hints = { minimum: field('minimum'), preferred: field('preferred'), maximum: field('maximum') };
  }
  const [readOnly, canFlush, canDiscard, canWriteZeroes] = flags;
  return new CheckedBackend(value as BlockBackend, readOnly, canFlush, canDiscard, canWriteZeroes, {
    hasResize: resize !== undefined, hasExtents: extents !== undefined, blockSize: hints,
    concurrency: concurrency as BackendConcurrency | undefined,
  });
}
