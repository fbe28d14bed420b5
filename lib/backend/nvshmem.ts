// NvshmemContext: this process's NVSHMEM PE, shared by every user in the process (the low-latency
// engine's NVSHMEM transport, the internode kernels). NVSHMEM allows one PE per process, so the
// native side counts users: the first `init` starts NVSHMEM, later ones (same rank, size, device)
// share it, and NVSHMEM is finalised when the last user calls `finalize`.
//
//   const shmem = await NvshmemContext.init(group, device);       // collective over `group`
//   const base = shmem.alloc(bytes);   // collective: same offset on every PE, zeroed
//   const peer = shmem.ptr(1, base);   // load/store pointer to PE 1's copy, or 0 (puts only)
//   shmem.barrierAll(stream);
//   shmem.free(base); shmem.finalize();                           // both collective
//
// Collective calls (init, alloc, free, finalize) block the JS thread inside NVSHMEM until every PE
// arrives: every process must make them in the same order, with no group collective between the
// same two calls on some ranks only. Ranks of one process (LocalGroup) cannot be NVSHMEM PEs: init
// throws NotSupported naming them before NVSHMEM is started.

import { ptr } from "bun:ffi";
import { hostname } from "node:os";
import type { Group } from "../group.ts";
import { BunEpError, check, features, native, Status } from "../ffi.ts";
import { NVSHMEM_INIT, NVSHMEM_UNIQUE_ID_BYTES } from "../native/nvshmem.ts";
import { withDevice } from "../stream.ts";

/** Random per process: tells "same process" apart even where pids collide (containers). */
const PROCESS_TOKEN = Array.from(crypto.getRandomValues(new Uint8Array(8)), (b) => b.toString(16).padStart(2, "0")).join("");

/** Default symmetric heap when NVSHMEM_SYMMETRIC_SIZE is unset: 2 GiB. */
export const DEFAULT_NVSHMEM_HEAP_BYTES = 2 ** 31;

export interface NvshmemInitOptions {
  /** Symmetric heap size of this process, applied by the first init only when NVSHMEM_SYMMETRIC_SIZE
   *  is unset. Default DEFAULT_NVSHMEM_HEAP_BYTES. */
  heapBytes?: number;
}

const out0 = new BigInt64Array(1);
const out1 = new BigInt64Array(1);
const outPointer = new BigUint64Array(1);

/** Whether the loaded library was built with NVSHMEM (false also when no library loads). */
export function nvshmemBuilt(): boolean {
  try {
    return features().nvshmem;
  } catch {
    return false;
  }
}

export class NvshmemContext {
  /** This process's PE (equals the group rank). */
  readonly myPe: number;
  /** Number of PEs (equals the group size). */
  readonly nPes: number;
  readonly device: number;
  #finalized = false;

  private constructor(myPe: number, nPes: number, device: number) {
    this.myPe = myPe;
    this.nPes = nPes;
    this.device = device;
  }

  /**
   * Collective over `group`: rank 0 makes a unique id, the group carries it, every rank starts (or
   * joins this process's) NVSHMEM as PE `group.rank` of `group.size` on `device`.
   */
  static async init(group: Group, device: number, options: NvshmemInitOptions = {}): Promise<NvshmemContext> {
    const lib = native();
    const heapBytes = options.heapBytes ?? DEFAULT_NVSHMEM_HEAP_BYTES;
    if (!Number.isSafeInteger(heapBytes) || heapBytes < 0) {
      throw new RangeError(`heapBytes: expected a non-negative integer, got ${heapBytes}`);
    }
    // Rank 0's id (or an empty one when this build lacks NVSHMEM: every rank then throws below, together).
    const id = new Uint8Array(NVSHMEM_UNIQUE_ID_BYTES);
    let idError: BunEpError | null = null;
    if (group.rank === 0) {
      const status = lib.bun_ep_nvshmem_get_unique_id(id);
      if (status !== Status.Success) idError = new BunEpError(status, "NVSHMEM unique id on rank 0", String(lib.bun_ep_get_last_error() ?? ""));
    }
    const where = new TextEncoder().encode(`${hostname()}/${process.pid}/${PROCESS_TOKEN}`);
    const mine = new Uint8Array(1 + NVSHMEM_UNIQUE_ID_BYTES + where.length);
    mine[0] = idError === null ? 1 : 0;
    mine.set(id, 1);
    mine.set(where, 1 + NVSHMEM_UNIQUE_ID_BYTES);
    const all = await group.allGather(mine);

    const root = all[0]!;
    if (idError !== null) throw idError;
    if (root[0] !== 1) {
      throw new BunEpError(Status.NotSupported, `NVSHMEM init on rank ${group.rank}`, "rank 0 could not make an NVSHMEM unique id (see rank 0's error)");
    }
    const decoder = new TextDecoder();
    const places = all.map((bytes) => decoder.decode(bytes.subarray(1 + NVSHMEM_UNIQUE_ID_BYTES)));
    const myPlace = places[group.rank]!;
    const sameProcess = places.flatMap((place, rank) => (place === myPlace ? [rank] : []));
    if (sameProcess.length > 1) {
      throw new BunEpError(
        Status.NotSupported,
        `NVSHMEM init on rank ${group.rank}`,
        `ranks ${sameProcess.join(", ")} run in one process, but NVSHMEM allows one PE per process; ` +
          "run one rank per process (e.g. `bun bin/bun-ep.ts run`) to use NVSHMEM",
      );
    }

    const args = new BigInt64Array(NVSHMEM_INIT.fields);
    const rootId = root.slice(1, 1 + NVSHMEM_UNIQUE_ID_BYTES);
    args[NVSHMEM_INIT.uniqueId] = BigInt(ptr(rootId));
    args[NVSHMEM_INIT.rank] = BigInt(group.rank);
    args[NVSHMEM_INIT.numRanks] = BigInt(group.size);
    args[NVSHMEM_INIT.device] = BigInt(device);
    args[NVSHMEM_INIT.heapBytes] = BigInt(heapBytes);
    withDevice(device, () => check(lib.bun_ep_nvshmem_init(args, out0), `NVSHMEM init on rank ${group.rank} (device ${device})`));
    check(lib.bun_ep_nvshmem_info(out0, out1), `NVSHMEM info on rank ${group.rank}`);
    return new NvshmemContext(Number(out0[0]), Number(out1[0]), device);
  }

  /** Collective: `bytes` of the symmetric heap, zeroed on every PE before any PE returns. */
  alloc(bytes: number): number {
    this.#checkOpen("alloc");
    if (!Number.isSafeInteger(bytes) || bytes <= 0) throw new RangeError(`bytes: expected a positive integer, got ${bytes}`);
    check(native().bun_ep_nvshmem_malloc(bytes, outPointer), `nvshmem_malloc(${bytes}) on PE ${this.myPe}`);
    return Number(outPointer[0]);
  }

  /** Collective: releases a block from `alloc`. */
  free(localPtr: number): void {
    this.#checkOpen("free");
    check(native().bun_ep_nvshmem_free(localPtr), `nvshmem_free on PE ${this.myPe}`);
  }

  /** `remotePe`'s copy of the symmetric object at `localPtr` as a load/store pointer, or 0 when that
   *  PE is reachable only by NVSHMEM puts (another host). */
  ptr(remotePe: number, localPtr: number): number {
    this.#checkOpen("ptr");
    if (!Number.isInteger(remotePe) || remotePe < 0 || remotePe >= this.nPes) {
      throw new RangeError(`remotePe: expected 0..${this.nPes - 1}, got ${remotePe}`);
    }
    check(native().bun_ep_nvshmem_ptr(localPtr, remotePe, outPointer), `nvshmem_ptr to PE ${remotePe}`);
    return Number(outPointer[0]);
  }

  /** A barrier over all PEs ordered on `stream` (a CUDA stream handle; 0 = the legacy stream). */
  barrierAll(stream: number): void {
    this.#checkOpen("barrierAll");
    check(native().bun_ep_nvshmem_barrier_all(stream), `NVSHMEM barrier on PE ${this.myPe}`);
  }

  /** Collective when this is the process's last user: drops this user of NVSHMEM. Idempotent. */
  finalize(): void {
    if (this.#finalized) return;
    this.#finalized = true;
    check(native().bun_ep_nvshmem_finalize(null), `NVSHMEM finalize on PE ${this.myPe}`);
  }

  [Symbol.dispose](): void {
    this.finalize();
  }

  #checkOpen(what: string): void {
    if (this.#finalized) throw new Error(`${what}: this NvshmemContext (PE ${this.myPe}) was finalized`);
  }
}
