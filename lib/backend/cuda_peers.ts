// Peer pointers: every rank learns a device address of every other rank's buffer that its own
// kernels can dereference. Ranks of the same process share raw pointers (enabling peer access when
// their devices differ); ranks of other processes open each other's CUDA IPC handles.

import type { Group } from "../group.ts";
import { check, native } from "../ffi.ts";
import { IPC_HANDLE_BYTES } from "../native/runtime.ts";
import { withDevice } from "../stream.ts";

/** Random per process: tells "same process" apart even where pids collide (containers). */
const PROCESS_TOKEN = crypto.getRandomValues(new Uint8Array(16));

const MAGIC = 0x50455042; // "BPEP" little-endian
const VERSION = 1;
// magic u32, version u32, token 16, pid u32, device i32, ptr u64, IPC handle 64
const PAYLOAD_BYTES = 4 + 4 + 16 + 4 + 4 + 8 + IPC_HANDLE_BYTES;

interface PeerInfo {
  token: Uint8Array;
  pid: number;
  device: number;
  ptr: number;
  handle: Uint8Array;
}

const outPointer = new BigUint64Array(1);
const outInt = new Int32Array(1);

/** Every rank's address of one buffer as seen from this rank's device. */
export interface PeerPointers {
  /** Index = rank, this rank's own pointer included; 0 where that rank passed 0. */
  readonly ptrs: readonly number[];
  /** Which ranks live in this process (raw pointers) rather than in another (IPC). */
  readonly sameProcess: readonly boolean[];
  /** Close the IPC mappings opened for this exchange (the peers' memory itself stays theirs). */
  close(): void;
}

/** A cudaMalloc'd buffer: what CUDA IPC can export (stream-ordered allocations cannot). */
export class PeerBuffer {
  readonly ptr: number;
  readonly byteLength: number;
  readonly device: number;
  #freed = false;

  private constructor(ptr: number, byteLength: number, device: number) {
    this.ptr = ptr;
    this.byteLength = byteLength;
    this.device = device;
  }

  /** Zero-filled `byteLength` bytes on `device` (synchronous). */
  static allocate(device: number, byteLength: number): PeerBuffer {
    if (!Number.isSafeInteger(byteLength) || byteLength <= 0) {
      throw new RangeError(`byteLength: expected a positive integer, got ${String(byteLength)}`);
    }
    return withDevice(device, () => {
      const lib = native();
      check(lib.bun_ep_malloc(outPointer, byteLength), `allocating a ${byteLength}-byte peer buffer on device ${device}`);
      const ptr = Number(outPointer[0]);
      try {
        // The legacy stream: ordered after everything, and zeroed before any peer can see the buffer.
        check(lib.bun_ep_memset_async(ptr, 0, byteLength, 0), `zeroing a ${byteLength}-byte peer buffer`);
        check(lib.bun_ep_stream_synchronize(0), `zeroing a ${byteLength}-byte peer buffer`);
      } catch (err) {
        lib.bun_ep_free(ptr);
        throw err;
      }
      return new PeerBuffer(ptr, byteLength, device);
    });
  }

  get freed(): boolean {
    return this.#freed;
  }

  /** Release the memory (synchronizes the device). Peers must have closed their mappings. */
  free(): void {
    if (this.#freed) return;
    this.#freed = true;
    withDevice(this.device, () => check(native().bun_ep_free(this.ptr), `freeing a peer buffer on device ${this.device}`));
  }

  [Symbol.dispose](): void {
    this.free();
  }
}

function encode(device: number, localPtr: number): Uint8Array {
  const bytes = new Uint8Array(PAYLOAD_BYTES);
  const view = new DataView(bytes.buffer);
  view.setUint32(0, MAGIC, true);
  view.setUint32(4, VERSION, true);
  bytes.set(PROCESS_TOKEN, 8);
  view.setUint32(24, process.pid, true);
  view.setInt32(28, device, true);
  view.setBigUint64(32, BigInt(localPtr), true);
  if (localPtr !== 0) {
    const handle = new Uint8Array(IPC_HANDLE_BYTES);
    withDevice(device, () =>
      check(
        native().bun_ep_ipc_get_handle(localPtr, handle),
        `getting the CUDA IPC handle of 0x${localPtr.toString(16)} on device ${device} ` +
          "(the pointer must be the start of a cudaMalloc allocation, e.g. PeerBuffer)",
      ),
    );
    bytes.set(handle, 40);
  }
  return bytes;
}

function decode(bytes: Uint8Array, rank: number): PeerInfo {
  if (bytes.byteLength !== PAYLOAD_BYTES) {
    throw new Error(`exchangePeerPointers: rank ${rank} sent ${bytes.byteLength} bytes, expected ${PAYLOAD_BYTES}`);
  }
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  if (view.getUint32(0, true) !== MAGIC || view.getUint32(4, true) !== VERSION) {
    throw new Error(`exchangePeerPointers: rank ${rank} sent a payload of another format (magic/version mismatch)`);
  }
  return {
    token: bytes.slice(8, 24),
    pid: view.getUint32(24, true),
    device: view.getInt32(28, true),
    ptr: Number(view.getBigUint64(32, true)),
    handle: bytes.slice(40, 40 + IPC_HANDLE_BYTES),
  };
}

function sameToken(a: Uint8Array, b: Uint8Array): boolean {
  return a.length === b.length && a.every((v, i) => v === b[i]);
}

/**
 * Collective over `group`: every rank passes its buffer (`localPtr`, the start of a cudaMalloc
 * allocation such as PeerBuffer.ptr, or 0 for none) and the device it runs on; each gets every
 * rank's pointer usable by kernels on its own device.
 */
export async function exchangePeerPointers(group: Group, localPtr: number, device: number): Promise<PeerPointers> {
  if (!Number.isSafeInteger(localPtr) || localPtr < 0) {
    throw new RangeError(`localPtr: expected a device address (number >= 0), got ${String(localPtr)}`);
  }
  if (!Number.isInteger(device) || device < 0) {
    throw new RangeError(`device: expected a CUDA device ordinal, got ${String(device)}`);
  }
  const gathered = await group.allGather(encode(device, localPtr));
  const infos = gathered.map((bytes, rank) => decode(bytes, rank));
  const ptrs: number[] = [];
  const sameProcess: boolean[] = [];
  const opened: number[] = [];
  const closeOpened = (): void => {
    withDevice(device, () => {
      for (const ptr of opened.splice(0)) native().bun_ep_ipc_close_handle(ptr);
    });
  };
  try {
    infos.forEach((peer, rank) => {
      const local = sameToken(peer.token, PROCESS_TOKEN);
      sameProcess.push(local);
      if (peer.ptr === 0) {
        ptrs.push(0);
      } else if (local) {
        if (peer.device !== device) enablePeerAccess(device, peer.device, rank);
        ptrs.push(peer.ptr);
      } else {
        ptrs.push(openIpcHandle(device, peer, rank));
        opened.push(ptrs[rank]!);
      }
    });
  } catch (err) {
    closeOpened();
    throw err;
  }
  let closed = false;
  return {
    ptrs,
    sameProcess,
    close(): void {
      if (closed) return;
      closed = true;
      closeOpened();
    },
  };
}

function enablePeerAccess(device: number, peerDevice: number, rank: number): void {
  const lib = native();
  check(lib.bun_ep_can_access_peer(device, peerDevice, outInt), `checking peer access from device ${device} to ${peerDevice}`);
  if (outInt[0] !== 1) {
    throw new Error(
      `exchangePeerPointers: device ${device} cannot access device ${peerDevice} of rank ${rank} directly (no P2P/NVLink path)`,
    );
  }
  withDevice(device, () =>
    check(lib.bun_ep_enable_peer_access(peerDevice), `enabling peer access from device ${device} to ${peerDevice} (rank ${rank})`),
  );
}

function openIpcHandle(device: number, peer: PeerInfo, rank: number): number {
  withDevice(device, () =>
    check(
      native().bun_ep_ipc_open_handle(peer.handle, outPointer),
      `opening the CUDA IPC handle of rank ${rank} (pid ${peer.pid}, device ${peer.device}) on device ${device}`,
    ),
  );
  return Number(outPointer[0]);
}
