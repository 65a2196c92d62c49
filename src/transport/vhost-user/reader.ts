/**
 * A vhost-user message reader over a byte stream split anywhere, as node-postgres's
 * pg-protocol parser is: push chunks in, take messages out. The socket layer may use it,
 * or read exactly header then payload itself and call the codec directly; either way the
 * framing rules are the codec's.
 *
 * fds follow SCM_RIGHTS semantics: the fds pushed with a chunk are attached to the
 * chunk's first byte, and belong to the message that byte is part of. A sender that
 * sends each message with one sendmsg, fds included (QEMU, libvhost-user, vblk), so puts
 * a message's fds on its first byte; a receiver that never reads past the end of a
 * message (VHOST-USER-NOTES.md, "Wire format") so receives them with a chunk that starts
 * inside that message. Fds pushed with an empty chunk attach to the next byte pushed.
 */
import { UsageError } from '../../errors.js';
import { VHOST_USER_HEADER_SIZE } from '../../spec/vhost-user.js';
import { decodeHeader } from './codec.js';
import type { DecodeResult, Header } from './messages.js';

/** A message decoder of the codec, for one direction (see `codec.ts`). */
export type MessageDecoder<T> = (header: Header, payload: Uint8Array, fds: readonly number[]) => DecodeResult<T>;

interface FdMark {
  /** Stream offset of the byte the fds are attached to. */
  readonly at: number;
  readonly fds: readonly number[];
}

/**
 * Frames messages out of pushed chunks and decodes each with `decode`. Every fd pushed
 * comes back exactly once: inside a decoded message, in a failure, or from
 * {@link MessageReader.dispose}.
 */
export class MessageReader<T> {
  /** Unread bytes, oldest first; `chunkOffset` bytes of the first are already read. */
  private chunks: Uint8Array[] = [];
  private chunkOffset = 0;
  private buffered = 0;
  /** Stream offset of the next unread byte, and one past the last byte pushed. */
  private position = 0;
  private received = 0;
  /** fds not yet handed out, by the byte they are attached to, in stream order. */
  private marks: FdMark[] = [];
  /** The current message's header, once its 12 bytes are in. */
  private header: Header | undefined;
  /** After a header error or dispose(): no more framing, bytes are dropped. */
  private broken = false;
  private disposed = false;

  constructor(private readonly decode: MessageDecoder<T>) {}

  /**
   * Adds received bytes and the fds that came with them. The bytes are copied, so the
   * caller may reuse its buffer.
   */
  push(bytes: Uint8Array, fds: readonly number[] = []): void {
    if (this.disposed) throw new UsageError('DISPOSED', 'MessageReader.push after dispose()');
    if (fds.length > 0) this.marks.push({ at: this.received, fds: [...fds] });
    this.received += bytes.length;
    if (this.broken || bytes.length === 0) return;
    this.chunks.push(bytes.slice());
    this.buffered += bytes.length;
  }

  /**
   * The next complete message, decoded; undefined when more bytes are needed. A failure
   * with a `header` in its error left the stream framed (the caller may answer it and go
   * on); one without (BAD_VERSION, OVERSIZED) broke it: it carries every fd the reader
   * holds, and next() returns undefined from then on.
   */
  next(): DecodeResult<T> | undefined {
    if (this.broken) return undefined;
    if (this.header === undefined) {
      if (this.buffered < VHOST_USER_HEADER_SIZE) return undefined;
      const header = decodeHeader(this.take(VHOST_USER_HEADER_SIZE));
      if (!header.ok) {
        this.broken = true;
        this.chunks = [];
        this.buffered = 0;
        return { ok: false, error: header.error, fds: this.takeFds(Infinity) };
      }
      this.header = header.value;
    }
    if (this.buffered < this.header.size) return undefined;
    const header = this.header;
    this.header = undefined;
    const payload = this.take(header.size);
    return this.decode(header, payload, this.takeFds(this.position));
  }

  /**
   * Ends the reader and returns the fds it still holds (those of a message cut short by
   * a disconnect, or pushed after the stream broke): the caller closes them.
   */
  dispose(): number[] {
    this.disposed = true;
    this.broken = true;
    this.chunks = [];
    this.buffered = 0;
    return this.takeFds(Infinity);
  }

  /** The next `n` buffered bytes, as one new array. */
  private take(n: number): Uint8Array {
    const out = new Uint8Array(n);
    let filled = 0;
    while (filled < n) {
      const chunk = this.chunks[0];
      const count = Math.min(n - filled, chunk.length - this.chunkOffset);
      out.set(chunk.subarray(this.chunkOffset, this.chunkOffset + count), filled);
      filled += count;
      this.chunkOffset += count;
      if (this.chunkOffset === chunk.length) {
        this.chunks.shift();
        this.chunkOffset = 0;
      }
    }
    this.buffered -= n;
    this.position += n;
    return out;
  }

  /** Removes and returns the fds attached to bytes before stream offset `end`. */
  private takeFds(end: number): number[] {
    let i = 0;
    while (i < this.marks.length && this.marks[i].at < end) i++;
    return this.marks.splice(0, i).flatMap((m) => m.fds);
  }
}
