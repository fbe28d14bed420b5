// Timing of work forked over several ranks' streams of one process (LocalGroup): the rank-0 stream
// forks to the others and joins them again, with CUDA events, plainly launched or captured as one
// graph. Shared by bench/low_latency.ts and bench/ll_trace.ts.

import { Event, type Graph } from "../lib/stream.ts";
import type { RankState } from "../test/gpu/fixtures/ll_harness.ts";
import { median } from "./common.ts";

/** Time `enqueue` (work forked over every rank's stream) from stream 0: ms per iteration, after
 * `warmup` untimed iterations. `hostMs`, when given, gets the host's ms inside `enqueue` per timed
 * iteration (what launching costs the CPU; with R ranks it is also the launch skew between them). */
export function timeForked(states: RankState[], enqueue: () => void, iterations: number, warmup: number, hostMs?: number[]): number[] {
  const main = states[0]!.stream;
  const samples: number[] = [];
  for (let i = 0; i < warmup + iterations; i++) {
    const start = Event.create({ timing: true, device: main.device }).record(main);
    for (const st of states.slice(1)) st.stream.waitEvent(start);
    const hostStart = performance.now();
    enqueue();
    if (i >= warmup) hostMs?.push(performance.now() - hostStart);
    const joins = states.slice(1).map((st) => Event.create({ device: st.stream.device }).record(st.stream));
    for (const j of joins) main.waitEvent(j);
    const end = Event.create({ timing: true, device: main.device }).record(main);
    end.synchronize();
    if (i >= warmup) samples.push(start.elapsedMs(end));
    for (const e of [start, end, ...joins]) e.close();
  }
  for (const st of states) st.engine.checkError();
  return samples;
}

/** Capture `enqueue` forked over all ranks' streams into one graph. */
export function captureForked(states: RankState[], enqueue: () => void): Graph {
  const main = states[0]!.stream;
  main.beginCapture();
  // The graph keeps its own record and wait nodes: the events are closed once it is captured.
  const events = [Event.create({ device: main.device }).record(main)];
  for (const st of states.slice(1)) st.stream.waitEvent(events[0]!);
  enqueue();
  for (const st of states.slice(1)) {
    const join = Event.create({ device: st.stream.device }).record(st.stream);
    events.push(join);
    main.waitEvent(join);
  }
  const graph = main.endCapture();
  for (const e of events) e.close();
  return graph;
}

/** Launch `graph` on stream 0: ms per launch, after `warmup` untimed launches. */
export function timeGraph(states: RankState[], graph: Graph, iterations: number, warmup: number): number[] {
  const main = states[0]!.stream;
  const samples: number[] = [];
  for (let i = 0; i < warmup + iterations; i++) {
    const start = Event.create({ timing: true, device: main.device }).record(main);
    graph.launch(main);
    const end = Event.create({ timing: true, device: main.device }).record(main);
    end.synchronize();
    if (i >= warmup) samples.push(start.elapsedMs(end));
    start.close();
    end.close();
  }
  for (const st of states) st.engine.checkError();
  return samples;
}

/** `enqueue` captured once as a forked graph, the median ms of its launches divided by `calls`
 * (the calls it enqueues), the graph closed again. */
export function capturedMs(states: RankState[], enqueue: () => void, iterations: number, warmup: number, calls = 1): number {
  const graph = captureForked(states, enqueue);
  try {
    return median(timeGraph(states, graph, iterations, warmup)) / calls;
  } finally {
    graph.close();
  }
}
