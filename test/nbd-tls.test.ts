// TLS to an NBD server: nbdkit --tls=require with X.509 certificates made here by
// openssl (a CA, a server certificate for "localhost"); the NBD backend upgrades the
// connection with STARTTLS for nbds+unix:// URIs, verifies the server against the CA,
// and refuses a server it cannot verify, or clear text where TLS is required.
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { requirePeer } from '../scripts/guest/guest.js';
import { openNbdBackend } from '../src/node/nbd-backend.js';
import { startNbdkit, type NbdServer } from './support/nbd-servers.js';
import { scratchDir } from './e2e/serve-helpers.js';

function openssl(args: string[], cwd: string): void {
  execFileSync('openssl', args, { cwd, stdio: 'pipe' });
}

/** A CA and a server certificate for `name`, in the layout nbdkit's --tls-certificates reads. */
function makeCertificates(dir: string, name: string): void {
  mkdirSync(dir, { recursive: true });
  openssl(['req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-keyout', 'ca-key.pem', '-out', 'ca-cert.pem', '-days', '2', '-subj', '/CN=vblk test CA'], dir);
  openssl(['req', '-newkey', 'rsa:2048', '-nodes', '-keyout', 'server-key.pem', '-out', 'server.csr', '-subj', `/CN=${name}`], dir);
  execFileSync('sh', ['-c', `printf 'subjectAltName=DNS:${name}\\n' > ext.cnf`], { cwd: dir });
  openssl(['x509', '-req', '-in', 'server.csr', '-CA', 'ca-cert.pem', '-CAkey', 'ca-key.pem', '-CAcreateserial', '-out', 'server-cert.pem', '-days', '2', '-extfile', 'ext.cnf'], dir);
}

describe('NBD over TLS', { skip: requirePeer('nbdkit', 'openssl') }, () => {
  let scratch: { dir: string; cleanup(): void };
  let server: NbdServer;
  let certs: string;
  let socket: string;
  before(async () => {
    scratch = scratchDir('vblk-nbd-tls-');
    certs = join(scratch.dir, 'pki');
    makeCertificates(certs, 'localhost');
    socket = join(scratch.dir, 'tls.sock');
    server = await startNbdkit(['--tls=require', `--tls-certificates=${certs}`, 'memory', '1M'], socket);
  });
  after(async () => {
    await server.stop();
    scratch.cleanup();
  });

  test('nbds+unix:// with the CA: STARTTLS, then reads and writes inside TLS', async () => {
    const b = await openNbdBackend({ uri: `nbds+unix:///?socket=${socket}&tls-hostname=localhost`, tlsCertificates: certs });
    try {
      await b.write(4096, [new Uint8Array(4096).fill(0x42)]);
      await b.flush();
      const got = new Uint8Array(4096);
      await b.read(4096, [got]);
      assert.ok(got.every((x) => x === 0x42));
    } finally {
      await b.close();
    }
  });

  test('clear text to a server that requires TLS is refused, saying so', async () => {
    await assert.rejects(openNbdBackend({ uri: `nbd+unix:///?socket=${socket}` }),
      (e: Error & { code?: string }) => e.code === 'CONNECT_FAILED' && /requires TLS/.test(e.message));
  });

  test('a server the CA did not sign, or a certificate for another name, is refused', async () => {
    const other = join(scratch.dir, 'other');
    makeCertificates(other, 'localhost');
    await assert.rejects(openNbdBackend({ uri: `nbds+unix:///?socket=${socket}&tls-hostname=localhost`, tlsCertificates: other }),
      (e: Error & { code?: string }) => e.code === 'CONNECT_FAILED' && /certificate/i.test(e.message));
    await assert.rejects(openNbdBackend({ uri: `nbds+unix:///?socket=${socket}&tls-hostname=elsewhere.example`, tlsCertificates: certs }),
      (e: Error & { code?: string }) => e.code === 'CONNECT_FAILED' && /elsewhere\.example/.test(e.message));
    // tls-verify-peer=0 takes any certificate (the connection is still encrypted).
    const b = await openNbdBackend({ uri: `nbds+unix:///?socket=${socket}&tls-verify-peer=0`, tlsCertificates: other });
    await b.close();
  });
});
