// Lint: typescript-eslint's recommended rules, plus the layering rule of DESIGN.md:
// only src/node/ and src/cli/ may touch Node.js or the native addon.
import tseslint from 'typescript-eslint';

const nodeOnly = {
  patterns: [
    { group: ['node:*'], message: 'Only src/node/ and src/cli/ may import node:* (DESIGN.md, Layers).' },
    { group: ['**/node/*', '**/node/**'], message: 'Only src/node/ and src/cli/ may import the Node adapters.' },
    { group: ['**/cli/*', '**/cli/**'], message: 'The CLI sits on top; nothing imports it.' },
  ],
  paths: ['fs', 'path', 'os', 'net', 'child_process', 'crypto', 'events', 'stream', 'util', 'worker_threads', 'buffer']
    .map((name) => ({ name, message: 'Only src/node/ and src/cli/ may import Node.js built-ins.' })),
};

// The testing kit (src/testing/, published as vblk/testing) registers node:test tests
// and asserts with node:assert: that is its job, and both exist wherever its tests run.
// Every other Node module stays out, as in the other browser-safe layers.
const testingKit = {
  ...nodeOnly,
  patterns: [
    {
      group: ['node:*', '!node:test', '!node:assert', '!node:assert/strict'],
      message: 'src/testing/ may import node:test and node:assert only (DESIGN.md, Layers).',
    },
    ...nodeOnly.patterns.slice(1),
  ],
};

export default tseslint.config(
  { ignores: ['dist/', 'build/', 'node_modules/', '.cache/'] },
  ...tseslint.configs.recommended,
  {
    rules: {
      '@typescript-eslint/no-unused-vars': ['error', { argsIgnorePattern: '^_', varsIgnorePattern: '^_' }],
      'no-multiple-empty-lines': ['error', { max: 1, maxEOF: 0 }],
    },
  },
  {
    files: ['src/**/*.ts'],
    ignores: ['src/node/**', 'src/cli/**', 'src/**/*.test.ts'],
    rules: { 'no-restricted-imports': ['error', nodeOnly] },
  },
  {
    files: ['src/testing/**/*.ts'],
    ignores: ['src/**/*.test.ts'],
    rules: { 'no-restricted-imports': ['error', testingKit] },
  },
);
