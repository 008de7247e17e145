// **Reference server, not hydra:** stock js-libp2p `@libp2p/kad-dht` DHT servers for
// `hydra-bench compare` (crates/hydra-bench/src/compare.rs), N nodes in this one Node process.
//
//   NODES=3 RECORDS=10000 node bench-server.mjs
//
// Each node: TCP + Noise + Yamux, identify, ping, kad-dht in server mode on /ipfs/kad/1.0.0, an
// in-memory datastore (the default). Departure from stock: `peerInfoMapper: passthroughMapper`,
// because the default mapper strips the loopback addresses every peer here has, and a provider
// without addresses is left out of GET_PROVIDERS answers. Set-up, not configuration: node i dials
// nodes i+1..i+3 (a ring), as stock nodes would bootstrap from each other, and the RECORDS
// preloaded provider records (keys as `preload_key` in compare.rs derives them) go into the
// provider store of their home node before the node list is printed. Listens on 127.0.0.1 only.
// Prints one JSON line, [{"peer_id":…,"addrs":[…]}], then serves until killed.
import './polyfill.mjs'
import { createHash } from 'node:crypto'
import { createLibp2p } from 'libp2p'
import { tcp } from '@libp2p/tcp'
import { noise } from '@chainsafe/libp2p-noise'
import { yamux } from '@chainsafe/libp2p-yamux'
import { identify } from '@libp2p/identify'
import { ping } from '@libp2p/ping'
import { kadDHT, passthroughMapper } from '@libp2p/kad-dht'
import { generateKeyPair } from '@libp2p/crypto/keys'
import { peerIdFromPrivateKey } from '@libp2p/peer-id'
import { multiaddr } from '@multiformats/multiaddr'
import { CID } from 'multiformats/cid'

const nodes = Number(process.env.NODES ?? 3)
const records = Number(process.env.RECORDS ?? 0)
const PRELOAD_PROVIDERS = 64

function preloadKey (i) {
  const n = Buffer.alloc(8)
  n.writeBigUInt64LE(BigInt(i))
  const digest = createHash('sha256').update('hydra-bench-compare').update(n).digest()
  return Buffer.concat([Buffer.from([0x12, 0x20]), digest])
}

function home (key) {
  return Number(key.readBigUInt64LE(2) % BigInt(nodes))
}

const all = []
for (let i = 0; i < nodes; i++) {
  all.push(await createLibp2p({
    addresses: { listen: ['/ip4/127.0.0.1/tcp/0'] },
    transports: [tcp()],
    connectionEncrypters: [noise()],
    streamMuxers: [yamux()],
    services: {
      identify: identify(),
      ping: ping(),
      dht: kadDHT({ protocol: '/ipfs/kad/1.0.0', clientMode: false, peerInfoMapper: passthroughMapper })
    }
  }))
}

const providers = []
for (let j = 0; j < PRELOAD_PROVIDERS; j++) {
  const id = peerIdFromPrivateKey(await generateKeyPair('Ed25519'))
  providers.push({ id, addr: multiaddr(`/ip4/127.0.0.9/tcp/${4001 + j}`) })
}
if (records > 0) {
  for (const n of all) {
    for (const p of providers) await n.peerStore.merge(p.id, { multiaddrs: [p.addr] })
  }
}
const BATCH = 1000
for (let start = 0; start < records; start += BATCH) {
  const batch = []
  for (let i = start; i < Math.min(records, start + BATCH); i++) {
    const key = preloadKey(i)
    batch.push(all[home(key)].services.dht.providers.addProvider(CID.decode(key), providers[i % PRELOAD_PROVIDERS].id))
  }
  await Promise.all(batch)
}

// js-libp2p rate-limits inbound connections per source address (all of these come from
// 127.0.0.1), so a refused dial is retried after a pause.
async function dialRetrying (from, to) {
  for (let attempt = 0; ; attempt++) {
    try {
      return await from.dial(to.getMultiaddrs()[0], { signal: AbortSignal.timeout(10000) })
    } catch (err) {
      if (attempt >= 20) throw err
      await new Promise(resolve => setTimeout(resolve, 250))
    }
  }
}
for (let i = 0; i < nodes && nodes > 1; i++) {
  for (let d = 1; d <= Math.min(3, nodes - 1); d++) {
    await dialRetrying(all[i], all[(i + d) % nodes])
  }
}
const end = Date.now() + 20000
while (nodes > 1 && all.some(n => n.services.dht.routingTable.size === 0) && Date.now() < end) {
  await new Promise(resolve => setTimeout(resolve, 50))
}

console.log(JSON.stringify(all.map(n => ({
  peer_id: n.peerId.toString(),
  addrs: n.getMultiaddrs().map(a => a.toString().replace(/\/p2p\/.*$/, ''))
}))))
