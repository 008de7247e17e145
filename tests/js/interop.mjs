// Independent js-libp2p DHT peers exercising hydra heads over real TCP connections on loopback.
//
//   HEADS='[{"peer_id":"12D3…","addrs":["/ip4/127.0.0.1/tcp/…"]}]' node interop.mjs <mode> [count]
//
// Modes (each prints one JSON line on stdout and exits 0 unless something crashed):
//   provide-find  A js client provides <count> CIDs through the heads; a second js client,
//                 connected only to the heads, looks each one up.
//   cross         A js client provides <count> CIDs through the heads in HEADS (process A); a
//                 second js client connected only to the heads in HEADS_B (process B, sharing
//                 A's datastore) looks each one up.
//   walk          A js client provides <count> CIDs to the heads (only DHT servers at that time);
//                 then js DHT servers S1..S3 join as a chain (S1-heads, S2-S1, S3-S2) and a js
//                 finder connected only to S3 looks each CID up: a DHT walk through js and hydra.
//                 The CIDs are chosen so that the chain gets strictly closer to each key (see
//                 walkableSetup): js-libp2p follows only peers closer than the one that named them.
import './polyfill.mjs'
import { createLibp2p } from 'libp2p'
import { tcp } from '@libp2p/tcp'
import { noise } from '@chainsafe/libp2p-noise'
import { yamux } from '@chainsafe/libp2p-yamux'
import { identify } from '@libp2p/identify'
import { ping } from '@libp2p/ping'
import { kadDHT, passthroughMapper } from '@libp2p/kad-dht'
import { multiaddr } from '@multiformats/multiaddr'
import { generateKeyPair } from '@libp2p/crypto/keys'
import { peerIdFromPrivateKey, peerIdFromString } from '@libp2p/peer-id'
import { CID } from 'multiformats/cid'
import * as raw from 'multiformats/codecs/raw'
import { sha256 } from 'multiformats/hashes/sha2'

const heads = JSON.parse(process.env.HEADS ?? '[]')
const headsB = JSON.parse(process.env.HEADS_B ?? '[]')
const mode = process.argv[2]
const count = Number(process.argv[3] ?? 100)
const headIds = new Set([...heads, ...headsB].map(h => h.peer_id))

function log (...args) { console.error('[interop]', ...args) }

async function node (clientMode, privateKey) {
  return createLibp2p({
    privateKey,
    addresses: { listen: ['/ip4/127.0.0.1/tcp/0'] },
    transports: [tcp()],
    connectionEncrypters: [noise()],
    streamMuxers: [yamux()],
    services: {
      identify: identify(),
      ping: ping(),
      dht: kadDHT({
        protocol: '/ipfs/kad/1.0.0',
        clientMode,
        // Loopback addresses must survive: the default mappers may strip them.
        peerInfoMapper: passthroughMapper,
        allowQueryWithZeroPeers: false
      })
    }
  })
}

function headAddr (h) {
  const tcpAddr = h.addrs.find(a => a.includes('/tcp/'))
  return multiaddr(`${tcpAddr}/p2p/${h.peer_id}`)
}

async function waitFor (what, cond, ms = 20000) {
  const end = Date.now() + ms
  while (!cond()) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`)
    await new Promise(resolve => setTimeout(resolve, 50))
  }
}

async function dialHeads (n, list = heads) {
  for (const h of list) await n.dial(headAddr(h), { signal: AbortSignal.timeout(10000) })
  await waitFor('heads in routing table', () => n.services.dht.routingTable.size >= list.length)
}

async function cids (n) {
  const out = []
  for (let i = 0; i < n; i++) {
    const bytes = new TextEncoder().encode(`hydra interop ${process.pid} ${Date.now()} ${i} ${Math.random()}`)
    out.push(CID.createV1(raw.code, await sha256.digest(bytes)))
  }
  return out
}

/** Kademlia id of a peer or a key, as js-libp2p computes it: SHA-256 of the bytes. */
async function kadId (bytes) {
  return (await sha256.digest(bytes)).digest
}

/** XOR distance of two kad ids as a bigint, for comparisons. */
function distance (a, b) {
  let d = 0n
  for (let i = 0; i < a.length; i++) d = (d << 8n) | BigInt(a[i] ^ b[i])
  return d
}

/**
 * Identities for the js servers S1..S3 and <count> CIDs for which a walk S3 -> S2 -> S1 -> heads
 * gets strictly closer at each hop: d(nearest head) < d(S1) < d(S2) < d(S3). js-libp2p's query
 * path follows a returned peer only if it is closer to the key than the peer that returned it, so
 * in a network of seven servers a random key is walkable from S3 only by chance (CI once missed
 * 1 of 20). About one key in ten qualifies; XOR distance is an ultrametric, so for some triples of
 * identities no key does (S2 the odd one out): those are drawn again.
 */
async function walkableSetup (n) {
  const heads = await Promise.all([...headIds].map(id => kadId(peerIdFromString(id).toMultihash().bytes)))
  let tried = 0
  for (let triple = 0; triple < 20; triple++) {
    const chainKeys = await Promise.all([1, 2, 3].map(() => generateKeyPair('Ed25519')))
    const chain = await Promise.all(chainKeys.map(k => kadId(peerIdFromPrivateKey(k).toMultihash().bytes)))
    const list = []
    for (let i = 0; i < 100 * n && list.length < n; i++, tried++) {
      const [cid] = await cids(1)
      const key = await kadId(cid.multihash.bytes)
      const nearestHead = heads.map(h => distance(h, key)).reduce((a, b) => (a < b ? a : b))
      const [d1, d2, d3] = chain.map(c => distance(c, key))
      if (nearestHead < d1 && d1 < d2 && d2 < d3) list.push(cid)
    }
    if (list.length === n) {
      log(`walk: ${n} walkable CIDs out of ${tried} random ones (identity triple ${triple + 1})`)
      return { chainKeys, list }
    }
  }
  throw new Error(`no ${n} walkable CIDs after ${tried} tries`)
}

async function provideAll (provider, list) {
  let provided = 0
  for (const cid of list) {
    for await (const _ of provider.services.dht.provide(cid, { signal: AbortSignal.timeout(20000) })) { /* drain */ }
    provided++
  }
  return provided
}

/** One lookup of `cid`: resolves to the answering peer's id if `want` was found, else null. */
async function findOnce (finder, cid, want, stats) {
  const ctl = new AbortController()
  const timer = setTimeout(() => ctl.abort(), 20000)
  let queried = 0
  try {
    for await (const ev of finder.services.dht.findProviders(cid, { signal: ctl.signal })) {
      if (ev.name === 'SEND_QUERY') queried++
      if (ev.name === 'PROVIDER' && ev.providers.some(p => p.id.equals(want))) {
        stats.maxHops = Math.max(stats.maxHops, queried)
        ctl.abort()
        return ev.from.toString()
      }
    }
  } catch (err) {
    if (!ctl.signal.aborted) log('findProviders failed:', err.message)
  } finally {
    clearTimeout(timer)
  }
  return null
}

/**
 * Look up each CID; count those where `want` was found, and those whose answer came from one of
 * `answering`. A miss is retried once, as a real client would (in a network of a handful of nodes
 * the js query can end before its walk reaches a head); `retried` reports how often.
 */
async function findAll (finder, list, want, answering = headIds) {
  const stats = { found: 0, viaHydra: 0, maxHops: 0, retried: 0 }
  for (const cid of list) {
    let from = await findOnce(finder, cid, want, stats)
    if (from == null) {
      stats.retried++
      from = await findOnce(finder, cid, want, stats)
    }
    if (from != null) {
      stats.found++
      if (answering.has(from)) stats.viaHydra++
    }
  }
  return stats
}

async function main () {
  if (heads.length === 0) throw new Error('HEADS is empty')
  const started = []
  try {
    if (mode === 'provide-find') {
      const provider = await node(true); started.push(provider)
      await dialHeads(provider)
      const list = await cids(count)
      const provided = await provideAll(provider, list)
      const finder = await node(true); started.push(finder)
      await dialHeads(finder)
      const r = await findAll(finder, list, provider.peerId)
      console.log(JSON.stringify({ mode, provided, ...r }))
    } else if (mode === 'cross') {
      if (headsB.length === 0) throw new Error('HEADS_B is empty')
      const provider = await node(true); started.push(provider)
      await dialHeads(provider, heads)
      const list = await cids(count)
      const provided = await provideAll(provider, list)
      // Process A writes behind: give its buffer a moment to reach the shared datastore.
      await new Promise(resolve => setTimeout(resolve, 1000))
      const finder = await node(true); started.push(finder)
      await dialHeads(finder, headsB)
      // viaHydra counts answers from process B's heads only.
      const r = await findAll(finder, list, provider.peerId, new Set(headsB.map(h => h.peer_id)))
      const aIds = new Set(heads.map(h => h.peer_id))
      const direct = finder.getConnections().map(c => c.remotePeer.toString())
      if (direct.some(p => aIds.has(p))) throw new Error('finder must never reach process A')
      console.log(JSON.stringify({ mode, provided, ...r }))
    } else if (mode === 'walk') {
      // The servers' identities are made first so that the CIDs can be chosen against them.
      const { chainKeys, list } = await walkableSetup(count)
      const provider = await node(true); started.push(provider)
      await dialHeads(provider)
      const provided = await provideAll(provider, list)
      await provider.stop(); started.shift()

      const s1 = await node(false, chainKeys[0]); started.push(s1)
      await dialHeads(s1)
      const s2 = await node(false, chainKeys[1]); started.push(s2)
      await s2.dial(s1.getMultiaddrs()[0])
      await waitFor('s1 in s2 table', () => s2.services.dht.routingTable.size >= 1)
      const s3 = await node(false, chainKeys[2]); started.push(s3)
      await s3.dial(s2.getMultiaddrs()[0])
      await waitFor('s2 in s3 table', () => s3.services.dht.routingTable.size >= 1)
      const finder = await node(true); started.push(finder)
      await finder.dial(s3.getMultiaddrs()[0])
      await waitFor('s3 in finder table', () => finder.services.dht.routingTable.size >= 1)
      const direct = finder.getConnections().map(c => c.remotePeer.toString())
      if (direct.some(p => headIds.has(p))) throw new Error('finder must not start connected to a head')
      const r = await findAll(finder, list, provider.peerId)
      console.log(JSON.stringify({ mode, provided, ...r }))
    } else {
      throw new Error(`unknown mode ${mode}`)
    }
  } finally {
    await Promise.allSettled(started.map(n => n.stop()))
  }
}

main().then(() => process.exit(0), err => { log(err?.stack ?? err); process.exit(1) })
