/**
 * A first-in first-out queue over an array: taking from the front moves an index rather
 * than shifting the array, and the taken slots are dropped once they are half of it, so
 * a queue that never runs empty stays bounded. For the backends' waiting lines (the
 * serial gate, the throttle filter).
 */
export class Fifo<T> {
  private items: (T | undefined)[] = [];
  private head = 0;

  /** Nothing is queued. */
  get isEmpty(): boolean {
    return this.head === this.items.length;
  }

  /** Queues `item` last. */
  push(item: T): void {
    this.items.push(item);
  }

  /** The first item; only when not {@link isEmpty}. */
  peek(): T {
    return this.items[this.head] as T;
  }

  /** Removes and returns the first item; only when not {@link isEmpty}. */
  shift(): T {
    const item = this.items[this.head] as T;
    // Cleared so the queue does not keep what it handed out alive.
    this.items[this.head++] = undefined;
    if (this.head === this.items.length) {
      this.items.length = 0;
      this.head = 0;
    } else if (this.head > COMPACT_AFTER && this.head * 2 > this.items.length) {
      this.items = this.items.slice(this.head);
      this.head = 0;
    }
    return item;
  }
}

/** Taken slots the array may hold before they are dropped. */
const COMPACT_AFTER = 64;
