/**
 * `vblk image create | info | check`: making and inspecting image files without serving
 * them. Each subcommand lives in its own module (image-<name>.ts).
 */
import { command as check } from './image-check.js';
import { command as create } from './image-create.js';
import { command as info } from './image-info.js';
import { defineCommand } from './command.js';

export const command = defineCommand({
  name: 'image',
  summary: 'create, inspect and check raw and qcow2 image files',
  usage: '(create | info | check) ...',
  options: {},
  subcommands: [create, info, check],
  run() {
    // The dispatcher runs a subcommand; this is reached only if it is changed not to.
    return Promise.reject(new Error('vblk image: run a subcommand (create, info, check)'));
  },
});
