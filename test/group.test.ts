// Rank groups: TcpGroup across real processes and in one process, malformed frames, timeouts that
// name the missing ranks, LocalGroup, and the torchrun variables.
import { describe, expect, test } from "bun:test";
import { join } from "node:path";
import {
  encodeFrameHeader,
  FrameDecoder,
  FrameType,
  GroupError,
  LocalGroup,
  readEnvLayout,
  TcpGroup,
  WIRE_HEADER_BYTES,
  WIRE_MAGIC,
} from "../lib/group.ts";
import { findFreePort } from "../lib/launch.ts";
import { COLLECTIVE_SCRIPT, payloadFor } from "./fixtures/group_payloads.ts";

const RANK_SCRIPT = join(import.meta.dir, "fixtures", "group_rank.ts");

interface RankRun {
  rank: number;
  exitCode: number | null;
  stdout: string;
  stderr: string;
}

/** Start `ranks` of a `size`-rank group as processes running group_rank.ts in `mode`. */
async function runRanks(
  size: number,
  ranks: number[],
  mode: (rank: number) => string,
  extraEnv: Record<string, string> = {},
): Promise<RankRun[]> {
  const port = findFreePort();
  const children = ranks.map((rank) =>
    Bun.spawn({
      cmd: [process.execPath, RANK_SCRIPT, mode(rank)],
      env: {
        ...process.env,
        RANK: String(rank),
        WORLD_SIZE: String(size),
        LOCAL_RANK: String(rank),
        LOCAL_WORLD_SIZE: String(size),
        MASTER_ADDR: "127.0.0.1",
        MASTER_PORT: String(port),
        ...extraEnv,
      },
      stdout: "pipe",
      stderr: "pipe",
    }),
  );
  return Promise.all(
    children.map(async (child, index) => {
      const [stdout, stderr] = await Promise.all([new Response(child.stdout).text(), new Response(child.stderr).text()]);
      await child.exited;
      return { rank: ranks[index]!, exitCode: child.exitCode, stdout, stderr };
    }),
  );
}

/** Connect ranks of one TcpGroup inside this process. */
function connectAll(size: number, port: number, ranks: number[], options: { timeoutMs?: number; maxFrameBytes?: number } = {}) {
  return ranks.map((rank) =>
    TcpGroup.connect({
      rank,
      size,
      masterAddr: "127.0.0.1",
      masterPort: port,
      timeoutMs: options.timeoutMs ?? 5000,
      maxFrameBytes: options.maxFrameBytes,
      onRejectedConnection: () => {},
    }),
  );
}

function expectRejects(promise: Promise<unknown>): Promise<GroupError> {
  return promise.then(
    () => {
      throw new Error("expected a rejection");
    },
    (error: unknown) => {
      expect(error).toBeInstanceOf(GroupError);
      return error as GroupError;
    },
  );
}

describe("TcpGroup across 4 processes", () => {
  test("allGather/broadcast/barrier results are exact (payloads 0 B to 3 MB)", async () => {
    const seed = (Date.now() % 100000) + 1;
    const runs = await runRanks(4, [0, 1, 2, 3], () => "collectives", { GROUP_TEST_SEED: String(seed) });
    for (const run of runs) {
      if (run.exitCode !== 0 || !run.stdout.includes("ok")) {
        throw new Error(`rank ${run.rank} failed (seed ${seed}): exit ${run.exitCode}\n${run.stdout}\n${run.stderr}`);
      }
    }
    const digests = runs.map((run) => /digest (\d+)/.exec(run.stdout)?.[1]);
    expect(digests[0]).toBeDefined();
    expect(new Set(digests).size).toBe(1);
    // The script the ranks ran really covers the sizes the test claims.
    expect(Math.max(...COLLECTIVE_SCRIPT.map((step) => ("bytes" in step ? step.bytes : 0)))).toBeGreaterThanOrEqual(3 << 20);
  }, 30000);

  test("a rank that never joins: the others fail within the timeout naming it", async () => {
    const started = performance.now();
    const runs = await runRanks(4, [0, 1, 2], () => "join-only", { GROUP_TEST_TIMEOUT_MS: "1500" });
    const elapsed = performance.now() - started;
    for (const run of runs) {
      expect(run.exitCode).toBe(3);
      expect(run.stdout).toMatch(/rank 3 never joined the group at 127\.0\.0\.1:\d+ \(waited 1500 ms\)/);
    }
    expect(elapsed).toBeLessThan(8000);
  }, 20000);

  test("a rank whose process dies makes the others' pending allGather fail promptly, naming it", async () => {
    const runs = await runRanks(4, [0, 1, 2, 3], (rank) => (rank === 3 ? "join-exit" : "allgather"), {
      GROUP_TEST_TIMEOUT_MS: "15000",
    });
    expect(runs[3]!.exitCode).toBe(7);
    for (const run of runs.slice(0, 3)) {
      expect(run.exitCode).toBe(3);
      const match = /error (\d+) (.*)/.exec(run.stdout);
      expect(match?.[2]).toBe("allGather #1 failed: rank 3 lost its connection to the group");
      expect(Number(match?.[1])).toBeLessThan(5000); // long before the 15 s timeout
    }
  }, 30000);
});

describe("TcpGroup in one process", () => {
  test("a collective a rank never calls times out naming that rank", async () => {
    const groups = await Promise.all(connectAll(4, findFreePort(), [0, 1, 2, 3], { timeoutMs: 600 }));
    const started = performance.now();
    const errors = await Promise.all(groups.slice(0, 2).map((group) => expectRejects(group.allGather(new Uint8Array(8)))));
    expect(performance.now() - started).toBeLessThan(3000);
    for (const error of errors) {
      expect(error.message).toBe("allGather #1 timed out after 600 ms: ranks 2, 3 did not arrive");
      expect(error.code).toBe("timeout");
      expect(error.ranks).toEqual([2, 3]);
    }
    // The group is unusable afterwards, and says why.
    const later = await expectRejects(groups[0]!.barrier());
    expect(later.message).toContain("barrier #2 failed: the group is unusable after an earlier error: allGather #1 timed out");
    for (const group of groups) group.close();
  });

  test("a rank that closes makes the others' collectives fail naming it", async () => {
    const groups = await Promise.all(connectAll(3, findFreePort(), [0, 1, 2]));
    await Promise.all(groups.map((group) => group.barrier()));
    groups[2]!.close();
    const error = await expectRejects(groups[1]!.allGather(new Uint8Array([1])));
    expect(error.message).toBe("allGather #2 failed: rank 2 closed the group");
    expect(error.ranks).toEqual([2]);
    const closed = await expectRejects(groups[2]!.barrier());
    expect(closed.code).toBe("closed");
    groups[0]!.close();
    groups[1]!.close();
  });

  test("big payloads stream across TCP chunks; maxFrameBytes bounds a contribution", async () => {
    const groups = await Promise.all(connectAll(3, findFreePort(), [0, 1, 2], { maxFrameBytes: 16 << 20 }));
    const payloads = groups.map((group) => payloadFor(7, 0, group.rank, 12 << 20));
    const results = await Promise.all(groups.map((group, rank) => group.allGather(payloads[rank]!)));
    for (const parts of results) parts.forEach((part, source) => expect(Buffer.compare(part, payloads[source]!)).toBe(0));
    // Results are each rank's own copies.
    results[0]![1]![0] = payloads[1]![0]! ^ 0xff;
    expect(results[2]![1]![0]).toBe(payloads[1]![0]!);
    const tooBig = groups[1]!.allGather(new Uint8Array((16 << 20) + 1));
    expect(tooBig).rejects.toThrow("allGather #2: 16777217 bytes exceed maxFrameBytes 16777216");
    for (const group of groups) group.close();
  });

  test("ranks calling different collectives at the same step fail with a mismatch error", async () => {
    const groups = await Promise.all(connectAll(2, findFreePort(), [0, 1]));
    const [a, b] = await Promise.all([expectRejects(groups[0]!.allGather(new Uint8Array(1))), expectRejects(groups[1]!.broadcast(new Uint8Array(1), 1))]);
    for (const error of [a, b]) {
      expect(error.message).toContain("collective mismatch: rank ");
      expect(error.message).toMatch(/allGather #1.*broadcast #1 \(root 1\)|broadcast #1 \(root 1\).*allGather #1/);
    }
    for (const group of groups) group.close();
  });

  test("bad arguments are rejected before anything is sent", async () => {
    await expect(
      TcpGroup.connect({ rank: 4, size: 4, masterAddr: "127.0.0.1", masterPort: 1 }),
    ).rejects.toThrow("TcpGroup.connect: rank must be an integer in [0, 4), got 4");
    await expect(
      TcpGroup.connect({ rank: 0, size: 6, ranksPerNode: 4, masterAddr: "127.0.0.1", masterPort: 1 }),
    ).rejects.toThrow("size 6 is not a multiple of ranksPerNode 4");
    await expect(
      TcpGroup.connect({ rank: 1, size: 2, masterAddr: "127.0.0.1", masterPort: 70000 }),
    ).rejects.toThrow("masterPort must be an integer in [1, 65535], got 70000");
    const groups = LocalGroup.create(2);
    expect(groups[0]!.broadcast(new Uint8Array(1), 2)).rejects.toThrow("broadcast: root must be an integer in [0, 2), got number 2");
    expect(groups[0]!.allGather("text" as unknown as Uint8Array)).rejects.toThrow("allGather: bytes must be a Uint8Array, got string text");
  });

  test("rank 0 on a port in use: the error says so and names MASTER_PORT", async () => {
    const squatter = Bun.listen({ hostname: "127.0.0.1", port: 0, socket: { data() {} } });
    const error = await expectRejects(connectAll(2, squatter.port, [0])[0]!);
    expect(error.code).toBe("listen");
    expect(error.message).toBe(
      `rank 0 could not open the group's store on 127.0.0.1:${squatter.port}: address already in use (choose another MASTER_PORT)`,
    );
    squatter.stop(true);
  });

  test("an unreachable store: the connect error names the address after retrying", async () => {
    const port = findFreePort();
    const error = await expectRejects(connectAll(2, port, [1], { timeoutMs: 400 })[0]!);
    expect(error.code).toBe("unreachable");
    expect(error.message).toMatch(
      new RegExp(`rank 1 could not reach the group's store at 127\\.0\\.0\\.1:${port} within 400 ms \\(\\d+ attempts; last error: ECONNREFUSED\\)`),
    );
  });
});

/** A raw TCP client: collects what the store sends, and whether it closed the connection. */
async function rawClient(port: number) {
  let received = new Uint8Array(0);
  let closedResolve!: () => void;
  const closed = new Promise<void>((resolve) => (closedResolve = resolve));
  const socket = await Bun.connect({
    hostname: "127.0.0.1",
    port,
    socket: {
      binaryType: "uint8array",
      data(_socket, chunk) {
        const joined = new Uint8Array(received.length + chunk.length);
        joined.set(received);
        joined.set(chunk, received.length);
        received = joined;
      },
      close: () => closedResolve(),
      error: () => closedResolve(),
    },
  });
  return {
    socket,
    closed,
    /** The frames received so far. */
    frames: () => new FrameDecoder(1 << 20).push(received),
  };
}

function header(fields: Partial<{ type: number; rank: number; arg: number; arg2: number; seq: number; kind: number }>, length: number | bigint = 0, magic = WIRE_MAGIC, version = 1) {
  return encodeFrameHeader(
    { type: FrameType.Hello, kind: 0, rank: 0, seq: 0, arg: 0, arg2: 0, ...fields },
    length,
    magic,
    version,
  );
}

describe("malformed frames", () => {
  test("the store rejects each bad frame with a clear error and closes that connection only", async () => {
    const port = findFreePort();
    const rejected: string[] = [];
    const size = 3;
    const rank0 = TcpGroup.connect({ rank: 0, size, masterAddr: "127.0.0.1", masterPort: port, timeoutMs: 5000, onRejectedConnection: (message) => rejected.push(message) });
    // Rank 1 joins now; the connect of both resolves only once rank 2 joins, after the bad frames.
    const rank1 = TcpGroup.connect({ rank: 1, size, masterAddr: "127.0.0.1", masterPort: port, timeoutMs: 5000 });
    const cases: [string, Uint8Array, string][] = [
      ["garbage", new TextEncoder().encode("GET / HTTP/1.1\r\n\r\n"), "bad magic 0x20544547"],
      ["bad version", header({ rank: 2, arg: size, arg2: size }, 0, WIRE_MAGIC, 9), "unsupported protocol version 9 (this bun-ep speaks 1)"],
      ["oversized", header({ type: FrameType.Contribute }, 1n << 40n), "CONTRIBUTE frame of 1099511627776 bytes exceeds maxFrameBytes 1073741824"],
      ["unknown type", header({ type: 42 }), "unknown frame type 42"],
      ["rank out of range", header({ rank: 7, arg: size, arg2: size }), "rank 7 out of range [0, 3)"],
      ["wrong size", header({ rank: 2, arg: 8, arg2: size }), "rank 2 has WORLD_SIZE 8 but the group has size 3"],
      ["not HELLO first", header({ type: FrameType.Contribute, rank: 2 }), "expected HELLO first, got CONTRIBUTE"],
      ["duplicate rank", header({ rank: 0, arg: size, arg2: size }), "duplicate rank 0: that rank already joined the group"],
    ];
    for (const [name, bytes, expected] of cases) {
      const client = await rawClient(port);
      client.socket.write(bytes);
      await client.closed;
      const frames = client.frames();
      expect(frames.length, name).toBe(1);
      expect(frames[0]!.type).toBe(FrameType.Error);
      const message = new TextDecoder().decode(frames[0]!.payload);
      expect(message, name).toStartWith("the group's store rejected a connection from 127.0.0.1:");
      expect(message, name).toContain(expected);
    }
    expect(rejected.length).toBe(cases.length);
    // A frame that only starts right: the magic is checked as soon as 4 bytes arrive.
    const slow = await rawClient(port);
    slow.socket.write(new Uint8Array([0x42, 0x55, 0x45, 0x50 ^ 1]));
    await slow.closed;
    expect(new TextDecoder().decode(slow.frames()[0]!.payload)).toContain("bad magic");

    // The group still forms and works after all that.
    const rank2 = await TcpGroup.connect({ rank: 2, size, masterAddr: "127.0.0.1", masterPort: port, timeoutMs: 5000 });
    const groups = [await rank0, await rank1, rank2];
    const parts = await Promise.all(groups.map((group) => group.allGather(new Uint8Array([group.rank * 3]))));
    expect(parts[1]!.map((part) => part[0])).toEqual([0, 3, 6]);
    for (const group of groups) group.close();
  });

  test("a joined rank that sends a malformed frame is dropped; the others fail naming it", async () => {
    const port = findFreePort();
    const size = 3;
    const joins = connectAll(size, port, [0, 1]);
    await Bun.sleep(50);
    const raw = await rawClient(port);
    raw.socket.write(header({ type: FrameType.Hello, rank: 2, arg: size, arg2: size }));
    const groups = await Promise.all(joins);
    const pending = groups.map((group) => expectRejects(group.allGather(new Uint8Array([1]))));
    await Bun.sleep(50);
    raw.socket.write(header({ type: FrameType.Contribute, rank: 1, seq: 1, kind: 1 }));
    await raw.closed;
    const toRaw = raw.frames().map((frame) => frame.type);
    expect(toRaw).toContain(FrameType.Error);
    expect(new TextDecoder().decode(raw.frames().at(-1)!.payload)).toBe(
      "the group's store rejected rank 2: frame claims rank 1 on the connection of rank 2",
    );
    for (const error of await Promise.all(pending)) {
      expect(error.message).toBe("allGather #1 failed: rank 2 was disconnected for sending a malformed frame");
    }
    for (const group of groups) group.close();
  });

  test("a rank rejects a store that does not speak the protocol", async () => {
    const port = findFreePort();
    const fake = Bun.listen({
      hostname: "127.0.0.1",
      port,
      socket: { data: (socket) => void socket.write("SSH-2.0-OpenSSH_9.6\r\n") },
    });
    const error = await expectRejects(connectAll(2, port, [1], { timeoutMs: 2000 })[0]!);
    expect(error.message).toBe(
      `bad frame from the group's store at 127.0.0.1:${port}: bad magic 0x2d485353 (expected 0x50455542, "BUEP"): not a bun-ep group peer`,
    );
    fake.stop(true);
  });

  test("the decoder reassembles frames split at every byte boundary", () => {
    const payload = payloadFor(3, 1, 2, 5000);
    const frame = new Uint8Array(WIRE_HEADER_BYTES + payload.length);
    frame.set(header({ type: FrameType.Part, rank: 2, seq: 9, arg: 1 }, payload.length));
    frame.set(payload, WIRE_HEADER_BYTES);
    const stream = new Uint8Array(frame.length * 2);
    stream.set(frame);
    stream.set(frame, frame.length);
    for (const cut of [1, 3, 4, 5, 31, 32, 33, 100, frame.length - 1, frame.length, frame.length + 7]) {
      const decoder = new FrameDecoder(1 << 20);
      const frames = [...decoder.push(stream.subarray(0, cut)), ...decoder.push(stream.subarray(cut))];
      expect(frames.length).toBe(2);
      for (const decoded of frames) {
        expect(decoded.seq).toBe(9);
        expect(Buffer.compare(decoded.payload, payload)).toBe(0);
      }
    }
  });
});

describe("LocalGroup", () => {
  test("4 ranks in one process: results exact", async () => {
    const groups = LocalGroup.create(4, { ranksPerNode: 2 });
    expect(groups.map((group) => [group.rank, group.size, group.ranksPerNode])).toEqual([
      [0, 4, 2],
      [1, 4, 2],
      [2, 4, 2],
      [3, 4, 2],
    ]);
    const seed = (Date.now() % 100000) + 1;
    for (const [step, op] of COLLECTIVE_SCRIPT.entries()) {
      if (op.kind === "allGather") {
        const results = await Promise.all(groups.map((group) => group.allGather(payloadFor(seed, step, group.rank, op.bytes))));
        for (const parts of results) {
          parts.forEach((part, source) => expect(Buffer.compare(part, payloadFor(seed, step, source, op.bytes)), `seed ${seed}`).toBe(0));
        }
      } else if (op.kind === "broadcast") {
        const expected = payloadFor(seed, step, op.root, op.bytes);
        const results = await Promise.all(groups.map((group) => group.broadcast(group.rank === op.root ? expected : new Uint8Array(5), op.root)));
        for (const result of results) expect(Buffer.compare(result, expected), `seed ${seed}`).toBe(0);
      } else {
        await Promise.all(groups.map((group) => group.barrier()));
      }
    }
    // Each rank owns its results.
    const results = await Promise.all(groups.map((group) => group.allGather(new Uint8Array([group.rank]))));
    results[0]![3]![0] = 99;
    expect(results[1]![3]![0]).toBe(3);
    for (const group of groups) group.close();
  });

  test("consecutive collectives issued before the first resolves never mix", async () => {
    const groups = LocalGroup.create(4);
    const [first, second] = await Promise.all([
      Promise.all(groups.map((group) => group.allGather(new Uint8Array([1, group.rank])))),
      // Ranks issue the second call in reverse order, before anything resolved.
      Promise.all([...groups].reverse().map((group) => group.allGather(new Uint8Array([2, group.rank])))),
    ]);
    for (const parts of first) expect(parts.map((part) => [...part])).toEqual([[1, 0], [1, 1], [1, 2], [1, 3]]);
    for (const parts of second) expect(parts.map((part) => [...part])).toEqual([[2, 0], [2, 1], [2, 2], [2, 3]]);
  });

  test("the timeout names the rank that did not arrive", async () => {
    const groups = LocalGroup.create(4, { timeoutMs: 300 });
    const errors = await Promise.all(groups.slice(0, 3).map((group) => expectRejects(group.barrier())));
    for (const error of errors) {
      expect(error.message).toBe("barrier #1 timed out after 300 ms: rank 3 did not arrive");
      expect(error.ranks).toEqual([3]);
    }
  });

  test("a closed rank is named by the others", async () => {
    const groups = LocalGroup.create(3);
    const pending = expectRejects(groups[0]!.broadcast(new Uint8Array([1]), 0));
    groups[1]!.close();
    expect((await pending).message).toBe("broadcast #1 (root 0) failed: rank 1 closed the group");
  });

  test("ranks calling different collectives (or roots) all fail with a mismatch error", async () => {
    const groups = LocalGroup.create(3);
    const errors = await Promise.all([
      expectRejects(groups[0]!.broadcast(new Uint8Array([1]), 0)),
      expectRejects(groups[1]!.broadcast(new Uint8Array([1]), 0)),
      expectRejects(groups[2]!.broadcast(new Uint8Array([1]), 2)),
    ]);
    for (const error of errors) {
      expect(error.code).toBe("mismatch");
      expect(error.message).toMatch(/collective mismatch: rank \d called broadcast #1 \(root \d\) but rank \d called broadcast #1 \(root \d\)/);
    }
  });

  test("options are checked", () => {
    expect(() => LocalGroup.create(0)).toThrow("LocalGroup.create: size must be a positive integer, got 0");
    expect(() => LocalGroup.create(4, { ranksPerNode: 3 })).toThrow("size 4 is not a multiple of ranksPerNode 3");
    expect(() => LocalGroup.create(2, { timeoutMs: -1 })).toThrow("timeoutMs must be a positive integer, got -1");
  });
});

describe("torchrun variables", () => {
  const base = { RANK: "1", WORLD_SIZE: "4", MASTER_ADDR: "127.0.0.1", MASTER_PORT: "29500" };

  test("a full set gives the layout", () => {
    expect(readEnvLayout({ ...base, LOCAL_RANK: "1", LOCAL_WORLD_SIZE: "2" })).toEqual({
      rank: 1,
      size: 4,
      localRank: 1,
      localSize: 2,
      ranksPerNode: 2,
      masterAddr: "127.0.0.1",
      masterPort: 29500,
    });
    expect(readEnvLayout(base).ranksPerNode).toBe(4);
    expect(readEnvLayout({ ...base, LOCAL_WORLD_SIZE: "4", BUN_EP_RANKS_PER_NODE: "2" }).ranksPerNode).toBe(2);
  });

  test("missing and invalid variables are named", () => {
    const without = (name: keyof typeof base) => {
      const env: Record<string, string> = { ...base };
      delete env[name];
      return env;
    };
    expect(() => readEnvLayout(without("RANK"))).toThrow("RANK is not set");
    expect(() => readEnvLayout(without("WORLD_SIZE"))).toThrow("WORLD_SIZE is not set");
    expect(() => readEnvLayout(without("MASTER_ADDR"))).toThrow("MASTER_ADDR is not set");
    expect(() => readEnvLayout(without("MASTER_PORT"))).toThrow("MASTER_PORT is not set");
    expect(() => readEnvLayout({ ...base, RANK: "4" })).toThrow('RANK="4" is invalid: expected an integer in [0, 3]');
    expect(() => readEnvLayout({ ...base, WORLD_SIZE: "four" })).toThrow('WORLD_SIZE="four" is invalid');
    expect(() => readEnvLayout({ ...base, MASTER_PORT: "99999" })).toThrow('MASTER_PORT="99999" is invalid: expected an integer in [1, 65535]');
    expect(() => readEnvLayout({ ...base, RANK: "1.5" })).toThrow('RANK="1.5" is invalid');
    expect(() => readEnvLayout({ ...base, LOCAL_WORLD_SIZE: "3" })).toThrow("LOCAL_WORLD_SIZE=3 does not divide WORLD_SIZE=4");
    expect(() => readEnvLayout({ ...base, BUN_EP_RANKS_PER_NODE: "3" })).toThrow("BUN_EP_RANKS_PER_NODE=3 does not divide WORLD_SIZE=4");
  });
});
