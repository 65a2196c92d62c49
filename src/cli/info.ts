/** `vblk info --socket PATH [--json]`: what the seed's probe learns about a vhost-user-blk device. */
import { STRING_UNITS, stringGetSize } from '../blk/size-string.js';
import { VIRTIO_BLK_F, VIRTIO_BLK_F_NAMES } from '../spec/virtio-blk.js';
import { VIRTIO_F_NAMES, featureBits } from '../spec/virtio.js';
import { CliUsageError } from './args.js';
import { defineCommand } from './command.js';
import { openSocketDriver } from './socket-driver.js';

export const command = defineCommand({
  name: 'info',
  summary: "probe a vhost-user-blk device and print what the driver learns (size, block sizes, geometry, serial, discard and secure-erase limits, features)",
  usage: '--socket PATH [--json]',
  options: {
    socket: { kind: 'string', valueName: 'PATH', description: "the device's vhost-user socket (required)" },
    json: { kind: 'boolean', description: 'print one JSON object on one line' },
  },
  async run({ options }, io) {
    if (options.socket === undefined) throw new CliUsageError('vblk info: --socket PATH is required');
    const { driver, close } = await openSocketDriver(options.socket, { queues: 64 });
    try {
      const c = driver.config;
      const bytes = driver.sizeBytes;
      const names = featureBits(driver.features).map((b) => VIRTIO_BLK_F_NAMES[b] ?? VIRTIO_F_NAMES[b] ?? `bit ${b}`);
      const discard = driver.has(VIRTIO_BLK_F.DISCARD)
        ? { max_sectors: c.maxDiscardSectors, max_segments: c.maxDiscardSeg, sector_alignment: c.discardSectorAlignment } : null;
      const writeZeroes = driver.has(VIRTIO_BLK_F.WRITE_ZEROES)
        ? { max_sectors: c.maxWriteZeroesSectors, max_segments: c.maxWriteZeroesSeg, may_unmap: c.writeZeroesMayUnmap !== 0 } : null;
      const secureErase = driver.has(VIRTIO_BLK_F.SECURE_ERASE)
        ? { max_sectors: c.maxSecureEraseSectors, max_segments: c.maxSecureEraseSeg, sector_alignment: c.secureEraseSectorAlignment } : null;
      const info = {
        name: driver.name,
        capacity_sectors: driver.capacity,
        size_bytes: bytes,
        size_decimal: stringGetSize(bytes, STRING_UNITS.STRING_UNITS_10),
        size_binary: stringGetSize(bytes, STRING_UNITS.STRING_UNITS_2),
        logical_block_size: driver.logicalBlockSize,
        physical_block_size: driver.physicalBlockSize,
        alignment_offset: driver.alignmentOffset,
        io_min: driver.ioMin,
        io_opt: driver.ioOpt,
        geometry: driver.geometry,
        read_only: driver.readOnly,
        serial: await driver.getId(),
        num_queues: driver.numQueues,
        seg_max: driver.segMax,
        size_max: driver.sizeMax,
        cache: driver.getCacheMode(),
        discard,
        write_zeroes: writeZeroes,
        secure_erase: secureErase,
        features: names,
      };
      if (options.json) {
        io.stdout(`${JSON.stringify(info)}\n`);
        return;
      }
      const g = info.geometry;
      const lines = [
        `${info.name}: ${info.capacity_sectors} 512-byte logical blocks (${info.size_decimal}/${info.size_binary}), ${bytes} bytes`,
        `  logical block size ${info.logical_block_size}, physical block size ${info.physical_block_size}, alignment offset ${info.alignment_offset}`,
        `  io_min ${info.io_min}, io_opt ${info.io_opt}`,
        `  geometry: ${g.cylinders} cylinders, ${g.heads} heads, ${g.sectors} sectors`,
        `  read-only: ${info.read_only ? 'yes' : 'no'}, cache: ${info.cache}`,
        `  serial: ${JSON.stringify(info.serial)}`,
        `  queues: ${info.num_queues}, seg_max ${info.seg_max}, size_max ${info.size_max}`,
        `  discard: ${discard ? `${discard.max_sectors} sectors × ${discard.max_segments} segments, alignment ${discard.sector_alignment}` : 'no'}`,
        `  write zeroes: ${writeZeroes ? `${writeZeroes.max_sectors} sectors × ${writeZeroes.max_segments} segments${writeZeroes.may_unmap ? ', may unmap' : ''}` : 'no'}`,
        `  secure erase: ${secureErase ? `${secureErase.max_sectors} sectors × ${secureErase.max_segments} segments, alignment ${secureErase.sector_alignment}` : 'no'}`,
        `  features: ${names.join(' ')}`,
      ];
      io.stdout(`${lines.join('\n')}\n`);
    } finally {
      await close();
    }
  },
});
