// The Delegated Routing V1 API and IPNS from independent implementations: Helia's routing client
// and the `ipns` package, against hydra on loopback.
//
//   node routing.mjs records
//     Prints JSON records made by the `ipns` package for one new Ed25519 name: {name, peerId,
//     routingKey, valid1, valid2, forged, wrongKey, expired} (hex), for the Rust test to send
//     through both doors (PUT_VALUE and HTTP PUT).
//
//   HEADS='[…]' ROUTING_URL=http://127.0.0.1:port/ node routing.mjs helia
//     A js-libp2p peer announces a CID and publishes an IPNS record (sequence 1) over the DHT to
//     the heads; Helia's client then asks the routing API for the CID's providers and the name's
//     record, puts a sequence-2 record through the API, and reads it back. Prints
//     {providerFound, ipnsFound, ipnsPut, ipnsAfterPut, staleRejected} on stdout.
import './polyfill.mjs'
import { createLibp2p } from 'libp2p'
import { tcp } from '@libp2p/tcp'
import { noise } from '@chainsafe/libp2p-noise'
import { yamux } from '@chainsafe/libp2p-yamux'
import { identify } from '@libp2p/identify'
import { ping } from '@libp2p/ping'
import { kadDHT, passthroughMapper } from '@libp2p/kad-dht'
import { multiaddr } from '@multiformats/multiaddr'
import { generateKeyPair, publicKeyToProtobuf } from '@libp2p/crypto/keys'
import { peerIdFromPrivateKey } from '@libp2p/peer-id'
import { defaultLogger } from '@libp2p/logger'
import { CID } from 'multiformats/cid'
import * as raw from 'multiformats/codecs/raw'
import { sha256 } from 'multiformats/hashes/sha2'
import { createIPNSRecord, marshalIPNSRecord, unmarshalIPNSRecord, multihashToIPNSRoutingKey } from 'ipns'
import { ipnsValidator } from 'ipns/validator'
import { delegatedRoutingV1HttpApiClient } from '@helia/delegated-routing-v1-http-api-client'

const mode = process.argv[2]
const HOUR = 60 * 60 * 1000
const hex = b => Buffer.from(b).toString('hex')
const equal = (a, b) => Buffer.compare(Buffer.from(a), Buffer.from(b)) === 0
function log (...args) { console.error('[routing]', ...args) }

async function records () {
  const key = await generateKeyPair('Ed25519')
  const other = await generateKeyPair('Ed25519')
  const peerId = peerIdFromPrivateKey(key)
  const value = CID.create(1, raw.code, await sha256.digest(new TextEncoder().encode('hello'))).toString()
  const valid1 = await createIPNSRecord(key, `/ipfs/${value}`, 1, HOUR)
  const valid2 = await createIPNSRecord(key, `/ipfs/${value}`, 2, HOUR)
  // Signed by another key, for this name (the name inlines the real key).
  const forged = await createIPNSRecord(other, `/ipfs/${value}`, 5, HOUR)
  // Embeds a public key that is not the name's.
  const wrongKey = { ...(await createIPNSRecord(other, `/ipfs/${value}`, 6, HOUR)), pubKey: publicKeyToProtobuf(other.publicKey) }
  // Valid for 1 ms: expired by the time it is sent.
  const expired = await createIPNSRecord(key, `/ipfs/${value}`, 7, 1)
  await new Promise(resolve => setTimeout(resolve, 20))
  const routingKey = multihashToIPNSRoutingKey(peerId.toMultihash())
  // The `ipns` package's own validator agrees with what the test expects of hydra.
  await ipnsValidator(routingKey, marshalIPNSRecord(valid2))
  for (const [what, r] of [['forged', forged], ['wrongKey', wrongKey], ['expired', expired]]) {
    let rejected = false
    try { await ipnsValidator(routingKey, marshalIPNSRecord(r)) } catch { rejected = true }
    if (!rejected) throw new Error(`the ipns package accepts the ${what} record`)
  }
  return {
    name: peerId.toCID().toString(),
    peerId: peerId.toString(),
    routingKey: hex(routingKey),
    valid1: hex(marshalIPNSRecord(valid1)),
    valid2: hex(marshalIPNSRecord(valid2)),
    forged: hex(marshalIPNSRecord(forged)),
    wrongKey: hex(marshalIPNSRecord(wrongKey)),
    expired: hex(marshalIPNSRecord(expired))
  }
}

async function helia () {
  const heads = JSON.parse(process.env.HEADS ?? '[]')
  const key = await generateKeyPair('Ed25519')
  const peerId = peerIdFromPrivateKey(key)
  const n = await createLibp2p({
    privateKey: key,
    addresses: { listen: ['/ip4/127.0.0.1/tcp/0'] },
    transports: [tcp()],
    connectionEncrypters: [noise()],
    streamMuxers: [yamux()],
    services: {
      identify: identify(),
      ping: ping(),
      dht: kadDHT({ protocol: '/ipfs/kad/1.0.0', clientMode: true, peerInfoMapper: passthroughMapper, allowQueryWithZeroPeers: false })
    }
  })
  for (const h of heads) {
    const tcpAddr = h.addrs.find(a => a.includes('/tcp/'))
    await n.dial(multiaddr(`${tcpAddr}/p2p/${h.peer_id}`), { signal: AbortSignal.timeout(10000) })
  }
  const end = Date.now() + 20000
  while (n.services.dht.routingTable.size < heads.length) {
    if (Date.now() > end) throw new Error('heads not in the routing table')
    await new Promise(resolve => setTimeout(resolve, 50))
  }
  const cid = CID.create(1, raw.code, await sha256.digest(new TextEncoder().encode(`routing ${Date.now()} ${Math.random()}`)))
  await n.contentRouting.provide(cid, { signal: AbortSignal.timeout(30000) })
  log('provided', cid.toString())
  const routingKey = multihashToIPNSRoutingKey(peerId.toMultihash())
  const rec1 = marshalIPNSRecord(await createIPNSRecord(key, `/ipfs/${cid}`, 1, HOUR))
  for await (const ev of n.services.dht.put(routingKey, rec1, { signal: AbortSignal.timeout(30000) })) {
    if (ev.name === 'QUERY_ERROR') log('put error', ev.error?.message)
  }
  log('published IPNS sequence 1 over the DHT')

  const client = delegatedRoutingV1HttpApiClient({ url: process.env.ROUTING_URL, timeout: 10000, cacheTTL: 0 })({ logger: defaultLogger() })
  await client.start?.()
  let providerFound = false
  // The record reaches the datastore within a flush interval; ask until it is there.
  for (let i = 0; i < 50 && !providerFound; i++) {
    for await (const p of client.getProviders(cid)) {
      // The client gives IDs as libp2p-key CIDs.
      if (p.ID.equals(peerId.toCID()) && p.Addrs.length > 0) providerFound = true
    }
    if (!providerFound) await new Promise(resolve => setTimeout(resolve, 200))
  }
  const name = peerId.toCID()
  const got = await client.getIPNS(name)
  const ipnsFound = equal(got, rec1)
  await ipnsValidator(routingKey, got)
  const rec2 = marshalIPNSRecord(await createIPNSRecord(key, `/ipfs/${cid}`, 2, HOUR))
  await client.putIPNS(name, rec2)
  const after = await client.getIPNS(name)
  const ipnsAfterPut = equal(after, rec2) && unmarshalIPNSRecord(after).sequence === 2n
  let staleRejected = false
  try { await client.putIPNS(name, rec1) } catch { staleRejected = true }
  const still = await client.getIPNS(name)
  await client.stop?.()
  await n.stop()
  return { providerFound, ipnsFound, ipnsPut: true, ipnsAfterPut, staleRejected: staleRejected && equal(still, rec2) }
}

const out = mode === 'records' ? await records() : mode === 'helia' ? await helia() : null
if (out == null) throw new Error(`unknown mode ${mode}`)
console.log(JSON.stringify(out))
process.exit(0)
