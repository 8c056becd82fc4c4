#!/usr/bin/env node
// A tour of the Sartiq generation service from Node.js, written only from the
// .proto files in ../../protos: upload an image, put it in the catalog, see a
// rich validation error, generate, watch (with a resume), rebuild the
// generation from its events, and download (with a resume). It does what a client on another machine would do: every byte goes
// over gRPC, nothing is read from the server's disk.
//
//   node tour.js --target 127.0.0.1:50051 --image dress.png --out ./out [--api-key KEY]
//
// Prints what it does, then `OK` and exits 0; on any failure prints the reason
// and exits 1.
'use strict';

const crypto = require('node:crypto');
const fs = require('node:fs');
const path = require('node:path');
const { parseArgs } = require('node:util');

const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');
const protobuf = require('protobufjs');

const PROTO_DIR = path.resolve(__dirname, '..', '..', 'protos');
const THIRD_PARTY_DIR = path.join(PROTO_DIR, 'third_party');

// The service documents 1 MiB as the largest upload chunk; the gRPC default
// message limit is 4 MiB, so this leaves room for framing.
const CHUNK_BYTES = 1024 * 1024;
// Generous deadlines: every call must end, but a small CPU machine renders slowly.
const UNARY_DEADLINE_MS = 30_000;
const STREAM_DEADLINE_MS = 120_000;

// ---------------------------------------------------------------------------
// Loading the contract

// The service protos, as grpc-js client constructors. keepCase keeps the proto
// field names (`size_bytes`, not `sizeBytes`); 64-bit integers become plain
// Numbers, which is safe here (sizes and sequences stay far below 2^53); enums
// are their names; defaults fill unset scalars so reads need no guards; oneofs
// add a property naming the member that is set (e.g. `item: 'event'`).
function loadServices() {
  const definition = protoLoader.loadSync(
    [
      'sartiq/generation/v1/generation_service.proto',
      'sartiq/generation/v1/artifact_service.proto',
      'sartiq/catalog/v1/catalog_service.proto',
    ],
    {
      includeDirs: [PROTO_DIR, THIRD_PARTY_DIR],
      keepCase: true,
      longs: Number,
      enums: String,
      defaults: true,
      oneofs: true,
    },
  );
  const loaded = grpc.loadPackageDefinition(definition);
  return {
    GenerationService: loaded.sartiq.generation.v1.GenerationService,
    ArtifactService: loaded.sartiq.generation.v1.ArtifactService,
    CatalogService: loaded.sartiq.catalog.v1.CatalogService,
  };
}

// The google.rpc error model, as protobufjs types. proto-loader only describes
// messages for grpc-js; decoding a trailer ourselves needs real codecs.
function loadErrorTypes() {
  const root = new protobuf.Root();
  // Resolve imports against the vendored protos; google/protobuf/*.proto are
  // bundled with protobufjs and found without this.
  root.resolvePath = (_origin, target) => path.join(THIRD_PARTY_DIR, target);
  root.loadSync(['google/rpc/status.proto', 'google/rpc/error_details.proto'], { keepCase: true });
  return {
    Status: root.lookupType('google.rpc.Status'),
    BadRequest: root.lookupType('google.rpc.BadRequest'),
    ErrorInfo: root.lookupType('google.rpc.ErrorInfo'),
  };
}

// ---------------------------------------------------------------------------
// Small helpers

function fail(reason) {
  throw new Error(reason);
}

function sha256Hex(bytes) {
  return crypto.createHash('sha256').update(bytes).digest('hex');
}

// Call options with a deadline; metadata is passed separately to every call.
function deadline(ms) {
  return { deadline: new Date(Date.now() + ms) };
}

// A unary call as a promise.
function unary(client, method, request, metadata) {
  return new Promise((resolve, reject) => {
    client[method](request, metadata, deadline(UNARY_DEADLINE_MS), (err, response) =>
      err ? reject(err) : resolve(response),
    );
  });
}

// Stop a server stream we no longer want, as a dropped connection would.
// Whatever the stream reports afterwards is the echo of our own stop: grpc-js's
// CANCELLED status, or Node's AbortError when a for-await loop is left early.
// It arrives as an 'error' event, which must have a listener or Node treats
// it as unhandled and crashes; we have what we wanted, so it is ignored.
function cancelStream(call) {
  call.on('error', () => {});
  call.cancel();
}

// ---------------------------------------------------------------------------
// The steps of the tour

async function upload(artifacts, metadata, bytes) {
  const response = await new Promise((resolve, reject) => {
    const call = artifacts.UploadArtifact(metadata, deadline(STREAM_DEADLINE_MS), (err, res) =>
      err ? reject(err) : resolve(res),
    );
    // Write with backpressure: wait for 'drain' whenever the buffer is full.
    (async () => {
      const write = (message) =>
        call.write(message) ? Promise.resolve() : new Promise((ok) => call.once('drain', ok));
      // The header first: the server refuses an oversized upload at once and
      // checks the total at the end.
      await write({ header: { size_bytes: bytes.length } });
      for (let start = 0; start < bytes.length; start += CHUNK_BYTES) {
        await write({ chunk: bytes.subarray(start, start + CHUNK_BYTES) });
      }
      call.end();
    })().catch(reject);
  });
  const artifact = response.artifact;
  if (artifact.sha256 !== sha256Hex(bytes)) {
    fail(`uploaded artifact ${artifact.sha256} is not the sha256 of the file`);
  }
  return artifact;
}

async function createProduct(catalog, metadata, sha256) {
  const response = await unary(
    catalog,
    'CreateProduct',
    {
      name: 'Red dress',
      description: 'a red silk dress',
      reference_images: [{ artifact: `artifact:${sha256}` }],
    },
    metadata,
  );
  return response.product;
}

// The google.rpc.Status the server put in the `grpc-status-details-bin`
// trailer, with the details we know unpacked; null when there is none (errors
// raised by the transport itself, such as most UNAVAILABLE, carry no details).
// grpc-js has already turned the base64 of a `-bin` header into a Buffer.
function errorDetails(err, types) {
  const values = err.metadata ? err.metadata.get('grpc-status-details-bin') : [];
  if (values.length === 0) return null;
  const status = types.Status.decode(values[0]);
  const details = { status, badRequest: null, errorInfo: null };
  // An Any says what it holds by the name at the end of its type URL
  // (`type.googleapis.com/google.rpc.BadRequest`). Kinds we do not know are
  // skipped: a server may add new ones.
  for (const any of status.details) {
    const name = any.type_url.slice(any.type_url.lastIndexOf('/') + 1);
    if (name === 'google.rpc.BadRequest') details.badRequest = types.BadRequest.decode(any.value);
    if (name === 'google.rpc.ErrorInfo') details.errorInfo = types.ErrorInfo.decode(any.value);
  }
  return details;
}

// The details as indented lines, for humans. Programs should branch on
// `errorInfo.reason` and the violation fields, never on messages.
function formatDetails(details) {
  const lines = [];
  if (details.errorInfo) {
    lines.push(`  reason ${details.errorInfo.reason} (domain ${details.errorInfo.domain})`);
  }
  for (const violation of details.badRequest?.field_violations ?? []) {
    lines.push(`  ${violation.field}: ${violation.description}`);
  }
  return lines;
}

// A create that breaks several rules at once: the server must name every
// offending field in one google.rpc.BadRequest, not just the first.
async function showValidationError(generations, metadata, types) {
  // No product or subject, no shot description, and a width that is not a
  // multiple of 8.
  const badRequest = { params: { width: 65 } };
  try {
    await unary(generations, 'CreateGenerateGeneration', badRequest, metadata);
  } catch (err) {
    if (err.code !== grpc.status.INVALID_ARGUMENT) throw err;
    const details = errorDetails(err, types);
    if (!details) fail('INVALID_ARGUMENT without a grpc-status-details-bin trailer');
    if (details.status.code !== err.code) {
      fail(`the trailer says code ${details.status.code}, the call ended with ${err.code}`);
    }
    if (!details.badRequest) fail('INVALID_ARGUMENT without a google.rpc.BadRequest detail');
    console.log(`bad request refused: ${details.status.message}`);
    for (const line of formatDetails(details)) console.log(line);
    const fields = details.badRequest.field_violations.map((violation) => violation.field);
    for (const expected of ['params.width', 'params.shot_type_string']) {
      if (!fields.includes(expected)) fail(`no field violation for ${expected}`);
    }
    return;
  }
  fail('the bad request was accepted');
}

async function createGeneration(generations, metadata, productId) {
  const response = await unary(
    generations,
    'CreateGenerateGeneration',
    {
      params: {
        product_id: productId,
        shot_type_string: 'full-body front',
        width: 256,
        height: 256,
        seed: 7,
        batch_size: 1,
      },
    },
    metadata,
  );
  return response.generation;
}

// Read events of one WatchGeneration call, from `afterSequence`, into `seen`.
// Stops after `limit` events (cancelling the call, as a dropped connection
// would) or at the terminal event; returns whether the terminal one came.
async function watchSome(generations, metadata, generationId, afterSequence, limit, seen) {
  const call = generations.WatchGeneration(
    { generation_id: generationId, after_sequence: afterSequence },
    metadata,
    deadline(STREAM_DEADLINE_MS),
  );
  let received = 0;
  for await (const item of call) {
    // Heartbeats only keep idle streams alive through proxies; no state.
    if (item.item !== 'event') continue;
    const event = item.event;
    seen.push(event);
    console.log(`  event ${event.sequence} ${event.kind}${event.terminal ? ' (terminal)' : ''}`);
    if (event.terminal) {
      // The server closes the stream right after the terminal event; let it.
      return true;
    }
    received += 1;
    if (received === limit) {
      cancelStream(call);
      return false;
    }
  }
  fail('the watch stream ended without a terminal event');
}

async function watchWithResume(generations, metadata, generationId) {
  const seen = [];
  console.log('watching (first 2 events, then a cut):');
  let terminal = await watchSome(generations, metadata, generationId, 0, 2, seen);
  if (!terminal) {
    // Resume from the last sequence received: the server replays what we
    // missed while disconnected, then goes live, with no gap and no duplicate.
    const last = seen[seen.length - 1].sequence;
    console.log(`resuming after sequence ${last}:`);
    terminal = await watchSome(generations, metadata, generationId, last, Infinity, seen);
  }
  // The log starts at 1 and grows by 1: exactly 1..N, in order.
  const sequences = seen.map((event) => event.sequence);
  sequences.forEach((sequence, index) => {
    if (sequence !== index + 1) {
      fail(`event sequences are not 1..${seen.length}: ${sequences.join(',')}`);
    }
  });
  console.log(`saw events 1..${seen.length} with no gap or duplicate`);
  return seen;
}

// Rebuild a generation from its events by the rule in the GenerationEvent
// comment: start from the GENERATION_CREATED tree, then replace each changed
// resource, keeping what events leave out (children, creation-time inputs, and
// a task's `parameters` when the event leaves that field unset). Presence is
// what counts: with `defaults: true` an unset message field reads as null,
// while an empty one would read as `{ fields: {} }` and replace.
function rebuild(events) {
  let tree = null;
  for (const event of events) {
    if (event.kind === 'EVENT_KIND_GENERATION_CREATED') {
      tree = structuredClone(event.generation);
    } else if (tree === null) {
      fail('the event log does not start with GENERATION_CREATED');
    } else {
      applyChange(tree, event);
    }
    tree.last_event_sequence = event.sequence;
    tree.prediction_counts = event.prediction_counts;
  }
  return tree;
}

const CREATION_INPUTS = ['refinement', 'labels', 'orchestration', 'request_id', 'organization'];

function applyChange(tree, event) {
  const change = structuredClone(event[event.payload]);
  const prediction = (id) => tree.predictions.find((p) => p.id === id);
  if (event.payload === 'generation') {
    // The `params` oneof names the member that is set (e.g. 'generate').
    for (const name of ['predictions', ...CREATION_INPUTS, 'params', tree.params]) {
      if (name) change[name] = tree[name];
    }
    for (const name of Object.keys(tree)) delete tree[name];
    Object.assign(tree, change);
  } else if (event.payload === 'prediction') {
    const current = prediction(change.id);
    if (!current) return tree.predictions.push(change);
    change.tasks = current.tasks;
    if (change.agentic) change.agentic.attempts = current.agentic?.attempts ?? [];
    tree.predictions[tree.predictions.indexOf(current)] = change;
  } else if (event.payload === 'task') {
    const tasks = prediction(change.prediction_id)?.tasks;
    if (!tasks) return;
    const index = tasks.findIndex((t) => t.id === change.id);
    if (index < 0) return tasks.push(change);
    if (change.parameters === null) change.parameters = tasks[index].parameters;
    tasks[index] = change;
  } else if (event.payload === 'attempt') {
    const attempts = prediction(change.prediction_id)?.agentic?.attempts;
    if (!attempts) return;
    const index = attempts.findIndex((a) => a.id === change.id);
    if (index < 0) attempts.push(change);
    else attempts[index] = change;
  }
}

// JSON with object keys sorted, so two decodings of the same message compare
// equal whatever order their map entries arrived in.
function canonical(value) {
  return JSON.stringify(value, (_key, item) =>
    item && typeof item === 'object' && !Array.isArray(item) && !Buffer.isBuffer(item)
      ? Object.fromEntries(Object.entries(item).sort(([a], [b]) => (a < b ? -1 : 1)))
      : item,
  );
}

async function finishedArtifact(generations, metadata, generationId, events) {
  const { generation } = await unary(
    generations,
    'GetGeneration',
    { generation_id: generationId },
    metadata,
  );
  // `done` is the forward-compatible test for "finished"; the status says how.
  if (!generation.done) fail(`generation ${generationId} is not done`);
  if (generation.status !== 'GENERATION_STATUS_COMPLETED') {
    fail(`generation ended ${generation.status}: ${JSON.stringify(generation.error)}`);
  }
  // The events alone rebuild exactly what GetGeneration shows.
  if (canonical(rebuild(events)) !== canonical(generation)) {
    fail('the generation rebuilt from its events differs from GetGeneration');
  }
  console.log(`rebuilt from ${events.length} events: equal to GetGeneration`);
  const artifact = generation.predictions[0]?.artifact;
  if (!artifact?.sha256) fail('the first prediction has no artifact');
  return artifact;
}

// One DownloadArtifact call from `offset`. With `firstOnly`, reads the first
// message and cancels, as a connection cut mid-download would.
async function downloadFrom(artifacts, metadata, sha256, offset, firstOnly) {
  const call = artifacts.DownloadArtifact(
    { sha256, offset },
    metadata,
    deadline(STREAM_DEADLINE_MS),
  );
  const chunks = [];
  let artifact = null;
  let position = offset;
  for await (const message of call) {
    if (message.artifact) artifact = message.artifact; // first message only
    // Each chunk says where it belongs; a resumed download must continue
    // exactly where we asked.
    if (message.offset !== position) fail(`chunk at ${message.offset}, expected ${position}`);
    chunks.push(message.chunk);
    position += message.chunk.length;
    if (firstOnly) {
      cancelStream(call);
      break;
    }
  }
  return { artifact, bytes: Buffer.concat(chunks) };
}

async function downloadWithResume(artifacts, metadata, sha256, outDir) {
  const first = await downloadFrom(artifacts, metadata, sha256, 0, true);
  if (!first.artifact) fail('the first download message carries no artifact');
  // Keep only half of what arrived, to show that a resume needs nothing but
  // the number of bytes already held.
  const kept = first.bytes.subarray(0, Math.floor(first.bytes.length / 2));
  console.log(`download cut after ${kept.length} of ${first.artifact.size_bytes} bytes; resuming`);
  const rest = await downloadFrom(artifacts, metadata, sha256, kept.length, false);
  const bytes = Buffer.concat([kept, rest.bytes]);
  if (bytes.length !== first.artifact.size_bytes) {
    fail(`downloaded ${bytes.length} bytes, the artifact has ${first.artifact.size_bytes}`);
  }
  if (sha256Hex(bytes) !== sha256) fail('the downloaded bytes do not match the artifact sha256');
  fs.mkdirSync(outDir, { recursive: true });
  const file = path.join(outDir, `${sha256}.png`);
  fs.writeFileSync(file, bytes);
  return file;
}

// ---------------------------------------------------------------------------
// Wiring

function parseCommandLine() {
  const { values } = parseArgs({
    options: {
      target: { type: 'string', default: '127.0.0.1:50051' },
      image: { type: 'string' },
      out: { type: 'string', default: 'out' },
      'api-key': { type: 'string', default: '' },
    },
  });
  if (!values.image) fail('usage: node tour.js --target host:port --image file.png --out dir');
  return values;
}

// Wait until the channel is connected, so an unreachable target is one clear
// error rather than a timeout in the middle of the tour.
function waitForReady(client) {
  return new Promise((resolve, reject) => {
    client.waitForReady(new Date(Date.now() + 10_000), (err) => {
      if (!err) return resolve();
      const target = client.getChannel().getTarget();
      return reject(new Error(`cannot reach ${target}: ${err.message}`));
    });
  });
}

async function main() {
  let types = null;
  try {
    const options = parseCommandLine();
    const services = loadServices();
    types = loadErrorTypes();
    await tour(options, services, types);
  } catch (err) {
    // grpc-js puts the code and its name in the message (`3 INVALID_ARGUMENT:
    // ...`); the trailer, when there is one, says which fields and why.
    console.error(`FAILED: ${err.message}`);
    const details = types && errorDetails(err, types);
    if (details) for (const line of formatDetails(details)) console.error(line);
    return 1;
  }
  console.log('OK');
  return 0;
}

async function tour(options, services, types) {
  // One connection for the three services. This example has no TLS; a server
  // reached over a network should be behind TLS (grpc.credentials.createSsl()).
  const credentials = grpc.credentials.createInsecure();
  const channel = new grpc.Channel(options.target, credentials, {});
  const clientOptions = { channelOverride: channel };
  const generations = new services.GenerationService(options.target, credentials, clientOptions);
  const artifacts = new services.ArtifactService(options.target, credentials, clientOptions);
  const catalog = new services.CatalogService(options.target, credentials, clientOptions);

  // The API key travels as call metadata on every call. (grpc-js refuses call
  // credentials on an insecure channel, so metadata it is.)
  const metadata = new grpc.Metadata();
  if (options['api-key']) metadata.set('authorization', `Bearer ${options['api-key']}`);

  try {
    await waitForReady(generations);

    const image = fs.readFileSync(options.image);
    const uploaded = await upload(artifacts, metadata, image);
    console.log(`uploaded ${options.image}: artifact ${uploaded.sha256}`);

    const product = await createProduct(catalog, metadata, uploaded.sha256);
    console.log(`created product ${product.id}`);

    await showValidationError(generations, metadata, types);

    const created = await createGeneration(generations, metadata, product.id);
    console.log(`created generation ${created.id} (${created.status})`);

    const events = await watchWithResume(generations, metadata, created.id);

    const artifact = await finishedArtifact(generations, metadata, created.id, events);
    console.log(`generation completed: artifact ${artifact.sha256}`);

    const file = await downloadWithResume(artifacts, metadata, artifact.sha256, options.out);
    console.log(`downloaded ${file}`);
  } finally {
    channel.close();
  }
}

// Exit explicitly: stdout and stderr are synchronous for files and pipes, so
// nothing printed is lost.
main().then((code) => process.exit(code));
