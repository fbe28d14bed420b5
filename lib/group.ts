// Rank groups: how ranks find each other and exchange small byte strings (CUDA IPC handles,
// NVSHMEM unique ids, host-backend payloads). Two implementations: TcpGroup (a store held by rank 0,
// torchrun variables) and LocalGroup (several ranks in one process). A server can plug in its own
// by implementing `Group`.

/** The whole contract a rank group must meet. Every method is collective over all ranks. */
export interface Group {
  /** This rank, 0 <= rank < size. */
  readonly rank: number;
  /** Number of ranks in the group. */
  readonly size: number;
  /** Ranks per node (host) for the node layout; `size` when every rank is on one node. */
  readonly ranksPerNode: number;
  /** Every rank's bytes, index = rank. Rejects with an error naming missing ranks on timeout. */
  allGather(bytes: Uint8Array): Promise<Uint8Array[]>;
  /** `root`'s bytes on every rank (`bytes` is ignored on other ranks). */
  broadcast(bytes: Uint8Array, root: number): Promise<Uint8Array>;
  /** Resolves once every rank has called it. */
  barrier(): Promise<void>;
  /** Leave the group; later calls reject. */
  close(): void;
}
