// The runtime on a real GPU: memory round trips, mapped pinned memory read with no copy, CUDA IPC
// across processes, peer pointers between ranks of one process, stream/event ordering and timing,
// graph replay. Skipped with a printed reason where there is no GPU or no built library.
import { expect, test } from "bun:test";
import { ptr as addressOf } from "bun:ffi";
import { resolve } from "node:path";
import { PeerBuffer, exchangePeerPointers } from "../../lib/backend/cuda_peers.ts";
import { BunEpError, check, features, native } from "../../lib/ffi.ts";
import { LocalGroup } from "../../lib/group.ts";
import { Event, Stream, deviceCount, deviceProps } from "../../lib/stream.ts";
import { DeviceTensor, HostTensor, PinnedTensor } from "../../lib/tensor.ts";
import { describeGpu } from "./gpu_env.ts";

const DEVICE = 0;
const FIXTURES = resolve(import.meta.dir, "fixtures");

function writeSequence(ptr: number, count: number, start: number, stream: Stream): void {
  check(native().bun_ep_debug_write_sequence(ptr, count, start, stream.handle), "bun_ep_debug_write_sequence");
}

function expectSequence(data: ArrayLike<number>, start: number, count = data.length): void {
  const wrong: string[] = [];
  for (let i = 0; i < count && wrong.length < 5; i++) {
    if (data[i] !== start + i) wrong.push(`[${i}] = ${data[i]}, expected ${start + i}`);
  }
  expect(wrong).toEqual([]);
}

function randomBytes(n: number, seed: number): Uint8Array {
  // xorshift32: reproducible from the printed seed.
  let s = seed >>> 0 || 1;
  const out = new Uint8Array(n);
  for (let i = 0; i < n; i++) {
    s ^= s << 13;
    s ^= s >>> 17;
    s ^= s << 5;
    out[i] = s & 0xff;
  }
  return out;
}

async function freePort(): Promise<number> {
  const server = Bun.listen({ hostname: "127.0.0.1", port: 0, socket: { data() {} } });
  const port = server.port;
  server.stop(true);
  return port;
}

describeGpu("runtime on the GPU", () => {
  test("device properties and features", () => {
    expect(deviceCount()).toBeGreaterThanOrEqual(1);
    const props = deviceProps(DEVICE);
    console.log(
      `device ${DEVICE}: ${props.name}, ${props.multiProcessorCount} SMs, sm_${props.computeCapability.join("")}, ` +
        `${(props.totalMemoryBytes / 2 ** 30).toFixed(1)} GiB, features ${JSON.stringify(features(), (_k, v) => (typeof v === "bigint" ? v.toString(16) : v))}`,
    );
    expect(props.name.length).toBeGreaterThan(0);
    expect(props.multiProcessorCount).toBeGreaterThan(0);
    expect(props.totalMemoryBytes).toBeGreaterThan(props.freeMemoryBytes);
    expect(props.freeMemoryBytes).toBeGreaterThan(0);
    expect(props.l2CacheBytes).toBeGreaterThan(0);
    expect(features().cuda).toBe(true);
  });

  test("alloc/memcpy round trip of random bytes, views and device-to-device copies", () => {
    const seed = (Date.now() & 0x7fffffff) | 1;
    const n = (1 << 20) + 7;
    const host = new HostTensor("u8", [n], randomBytes(n, seed));
    using device = DeviceTensor.fromHost(host, { device: DEVICE });
    const back = device.toHost();
    if (!Buffer.from(back.data).equals(Buffer.from(host.data))) throw new Error(`round trip differs (seed ${seed})`);

    using copy = DeviceTensor.empty("u8", [n], { device: DEVICE });
    copy.copyFrom(device);
    expect(Buffer.from(copy.toHost().data).equals(Buffer.from(host.data))).toBe(true);

    const matrix = new HostTensor("i32", [10, 3], Int32Array.from({ length: 30 }, (_, i) => i * 7 - 50));
    using onDevice = DeviceTensor.fromHost(matrix, { device: DEVICE });
    expect([...onDevice.rows(2, 5).toHost().data]).toEqual([...matrix.rows(2, 5).data]);
    expect([...onDevice.view([30]).toHost().data]).toEqual([...matrix.data]);

    using zeros = DeviceTensor.zeros("f32", [1000], { device: DEVICE });
    expect(zeros.toHost().data.every((v) => v === 0)).toBe(true);
    zeros.fillBytes(0xff);
    expect(new Uint8Array(zeros.toHost().data.buffer).every((v) => v === 0xff)).toBe(true);
  });

  test("freed tensors refuse use; a bad device is named", () => {
    const t = DeviceTensor.zeros("i32", [4], { device: DEVICE });
    const view = t.rows(1, 2);
    t.free();
    t.free(); // second free is a no-op
    expect(t.freed).toBe(true);
    expect(() => t.toHost()).toThrow("already freed");
    expect(() => view.toHost()).toThrow("already freed");
    const bad = deviceCount() + 5;
    expect(() => DeviceTensor.empty("f32", [1], { device: bad })).toThrow(`got ${bad}`);
    let caught: unknown;
    try {
      check(native().bun_ep_set_device(bad), "set device");
    } catch (err) {
      caught = err;
    }
    expect(caught).toBeInstanceOf(BunEpError);
    expect((caught as BunEpError).code).toBe("InvalidArgument");
  });

  test("a kernel writes mapped pinned memory; TS reads it through the typed array with no copy", () => {
    const count = 4096;
    const pinned = PinnedTensor.zeros("i32", [count]);
    // The typed array is the pinned memory itself, not a copy of it.
    expect(Number(addressOf(pinned.data))).toBe(pinned.hostPtr);
    expect(pinned.data.byteLength).toBe(count * 4);
    const stream = Stream.create({ device: DEVICE });
    writeSequence(pinned.devicePtr, count, 7, stream);
    stream.synchronize();
    expectSequence(pinned.data, 7);
    // Again: the same typed array object shows the new values.
    const sameArray = pinned.data;
    writeSequence(pinned.devicePtr, count, -300, stream);
    stream.synchronize();
    expectSequence(sameArray, -300);
    // And a DeviceTensor copy out of pinned memory sees the CPU's writes.
    pinned.data[0] = 123456;
    const onDevice = DeviceTensor.fromHost(pinned, { device: DEVICE, stream });
    expect(onDevice.toHost().data[0]).toBe(123456);
    onDevice.free();
    stream.close();
    pinned.free();
    expect(pinned.data.length).toBe(0); // detached: no read of freed memory
  });

  test("a CUDA IPC handle is opened by a second process", async () => {
    const count = 1 << 16;
    using buffer = PeerBuffer.allocate(DEVICE, count * 4);
    const stream = Stream.forDevice(DEVICE);
    writeSequence(buffer.ptr, count, 100, stream);
    stream.synchronize();
    const handle = new Uint8Array(64);
    check(native().bun_ep_ipc_get_handle(buffer.ptr, handle), "ipc get handle");
    const child = Bun.spawn(
      [process.execPath, resolve(FIXTURES, "ipc_child.ts"), Buffer.from(handle).toString("hex"), String(count), String(DEVICE), "100", "5000"],
      { stdout: "pipe", stderr: "pipe" },
    );
    const timer = setTimeout(() => child.kill(), 60_000);
    const [exitCode, stdout, stderr] = await Promise.all([child.exited, new Response(child.stdout).text(), new Response(child.stderr).text()]);
    clearTimeout(timer);
    if (exitCode !== 0) throw new Error(`IPC child exited ${exitCode}: ${stderr}${stdout}`);
    const report = JSON.parse(stdout.trim().split("\n").pop()!) as { pid: number; mismatches: string[] };
    expect(report.pid).not.toBe(process.pid);
    expect(report.mismatches).toEqual([]);
    // What the child wrote through its mapping is in our buffer.
    expectSequence(DeviceTensor.fromPointer(buffer.ptr, "i32", [count], DEVICE).toHost().data, 5000);
  });

  test("two processes exchange peer pointers (IPC) and read each other's buffer with a kernel", async () => {
    const port = await freePort();
    const count = 1000;
    const children = [0, 1].map((rank) =>
      Bun.spawn([process.execPath, resolve(FIXTURES, "peer_rank.ts"), String(rank), "2", String(port), String(count), String(DEVICE)], {
        stdout: "pipe",
        stderr: "pipe",
      }),
    );
    const timer = setTimeout(() => children.forEach((c) => c.kill()), 90_000);
    const results = await Promise.all(
      children.map(async (child) => ({
        exitCode: await child.exited,
        stdout: await new Response(child.stdout).text(),
        stderr: await new Response(child.stderr).text(),
      })),
    );
    clearTimeout(timer);
    results.forEach((r, rank) => {
      if (r.exitCode !== 0) throw new Error(`rank ${rank} exited ${r.exitCode}: ${r.stderr}${r.stdout}`);
    });
    for (const [rank, r] of results.entries()) {
      const report = JSON.parse(r.stdout.trim().split("\n").pop()!) as {
        seen: { rank: number; sameProcess: boolean; first: number; last: number; ok: boolean }[];
      };
      expect(report.seen).toEqual(
        [0, 1].map((peer) => ({ rank: peer, sameProcess: peer === rank, first: peer * 1000, last: peer * 1000 + count - 1, ok: true })),
      );
    }
  });

  test("two ranks of one process on one GPU exchange through plain pointers", async () => {
    const groups = LocalGroup.create(2);
    // 4096 i32 = 16 KiB takes the 16-byte-vector kernel; 1001 i32 (4004 bytes) the byte kernel.
    const runRank = async (group: LocalGroup, count: number) => {
      const rank = group.rank;
      const stream = Stream.create({ device: DEVICE });
      const mine = PeerBuffer.allocate(DEVICE, count * 4);
      writeSequence(mine.ptr, count, rank * 1000, stream);
      stream.synchronize();
      const peers = await exchangePeerPointers(group, mine.ptr, DEVICE);
      expect(peers.sameProcess).toEqual([true, true]);
      expect(peers.ptrs[rank]).toBe(mine.ptr);
      const other = 1 - rank;
      const received = DeviceTensor.empty("i32", [count], { device: DEVICE, stream });
      check(native().bun_ep_debug_copy_bytes(received.ptr, peers.ptrs[other]!, count * 4, 0, stream.handle), "copy");
      const data = received.toHost().data;
      received.free();
      await group.barrier();
      peers.close();
      mine.free();
      stream.close();
      return { rank, data };
    };
    for (const count of [4096, 1001]) {
      const results = await Promise.all(groups.map((g) => runRank(g, count)));
      for (const { rank, data } of results) expectSequence(data, (1 - rank) * 1000, count);
    }
    groups.forEach((g) => g.close());
  });

  test("stream/event ordering and elapsed time", () => {
    const spinMs = 100;
    using a = Stream.create({ device: DEVICE });
    using b = Stream.create({ device: DEVICE });
    using start = Event.create({ device: DEVICE, timing: true });
    using end = Event.create({ device: DEVICE, timing: true });
    const pinned = PinnedTensor.zeros("i32", [16]);
    start.record(a);
    check(native().bun_ep_debug_spin(BigInt(spinMs * 1e6), a.handle), "spin");
    end.record(a);
    // b waits for a's spin through the event, then writes the pinned memory.
    end.waitOn(b);
    writeSequence(pinned.devicePtr, 16, 1, b);
    expect(end.query()).toBe(false);
    expect(a.query()).toBe(false);
    expect(b.query()).toBe(false);
    expect(pinned.data[0]).toBe(0);
    end.synchronize();
    expect(end.query()).toBe(true);
    b.synchronize();
    expect(b.query()).toBe(true);
    expectSequence(pinned.data, 1);
    const elapsed = start.elapsedMs(end);
    console.log(`spin of ${spinMs} ms measured ${elapsed.toFixed(2)} ms by events`);
    expect(elapsed).toBeGreaterThanOrEqual(spinMs * 0.95);
    expect(elapsed).toBeLessThan(spinMs * 3);
    using untimed = Event.create({ device: DEVICE });
    untimed.record(a);
    expect(() => untimed.elapsedMs(end)).toThrow("timing: true");
    pinned.free();
  });

  test("a captured graph replays its work on every launch", () => {
    using stream = Stream.create({ device: DEVICE });
    using counter = DeviceTensor.zeros("i32", [1], { device: DEVICE, stream });
    stream.synchronize();
    stream.beginCapture();
    for (let i = 0; i < 3; i++) check(native().bun_ep_debug_increment(counter.ptr, stream.handle), "increment");
    using graph = stream.endCapture();
    stream.synchronize();
    expect(counter.toHost().data[0]).toBe(0); // captured, not run
    for (let i = 0; i < 10; i++) graph.launch(stream);
    expect(counter.toHost().data[0]).toBe(30);
    graph.launch(stream);
    expect(counter.toHost().data[0]).toBe(33);
    expect(() => Stream.legacy(DEVICE).beginCapture()).toThrow("legacy default stream cannot be captured");
  });

  test("launch timing from C works (used by bench/ffi.ts)", () => {
    using stream = Stream.create({ device: DEVICE });
    const ns = new Float64Array(1);
    check(native().bun_ep_debug_time_launches(1000, stream.handle, ns), "time launches");
    console.log(`C launch loop: ${ns[0]!.toFixed(0)} ns per empty-kernel launch`);
    expect(ns[0]!).toBeGreaterThan(0);
    expect(ns[0]!).toBeLessThan(1e6);
  });
});
