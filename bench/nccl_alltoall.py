"""What users would pick instead of an EP library: NCCL all-to-all on the same bytes as dispatch/combine.

    python3 bench/nccl_alltoall.py [--num-processes N] [--out FILE.json]

One process per GPU, torch.distributed over NCCL, all_to_all_single with per-destination byte counts
taken from the same kind of routing as our benches (top-k of |randn|+1 scores, seed 1234 + rank):
  normal (bench/normal.ts, DeepEP's prefill config): 4096 tokens per rank, hidden 7168, top-8 of 256
    experts; a token goes once to each rank that holds one of its experts. Dispatch bf16 rows of
    7168 x 2 bytes, dispatch fp8 rows of 7168 + 7168/128 x 4 bytes, combine = dispatch bf16 reversed.
    Timed like bench/normal.ts: L2 flushed, host barrier, CUDA events around one call, median of 49
    after 20 warm-ups; GB/s = bytes this rank receives / time (DeepEP's count). Rows "a2a" time the
    collective alone; rows "a2a+pack" add what a user must also do: gather the rows by destination
    before dispatch, and the weighted top-k sum (index_add_ in f32, then bf16) after combine.
  low-latency (bench/low_latency.ts, DeepEP's decode config): 128 tokens per rank, hidden 7168, top-8
    of 256 experts; one row per (token, expert) pair, fp8 rows (7168 + 224 bytes) for dispatch, bf16
    rows for combine. Median latency per call (events, barrier before each), and back-to-back: 50
    calls between two events / 50. No L2 flush (as bench/low_latency.ts).
Also, in the parent process after the ranks are done: peer copy GPU0<->GPU1 through the copy
engines (torch copy_ across devices), one direction alone and both at once, on the EP2 dispatch
bytes: the transport ceiling next to bench/copy.ts's SM-driven peer copy.
"""
import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

HIDDEN = 7168
TOPK = 8
NUM_EXPERTS = 256
WARMUPS = 20
RUNS = 49
LL_RUNS = 200
LL_LOOP = 50
FP8_ROW_BYTES = HIDDEN + HIDDEN // 128 * 4
BF16_ROW_BYTES = HIDDEN * 2


def routing(tokens, num_ranks, rank):
    """topk_idx [tokens, TOPK] from |randn|+1 scores, seeded per rank."""
    gen = torch.Generator(device="cuda")
    gen.manual_seed(1234 + rank)
    scores = torch.randn((tokens, NUM_EXPERTS), generator=gen, device="cuda").abs() + 1
    return torch.topk(scores, TOPK, dim=-1, sorted=False)[1]


def time_samples(fn, cpu_group, warmups, runs, flush=None):
    samples = []
    for i in range(warmups + runs):
        if flush is not None:
            flush.fill_(i & 0xFF)
        torch.cuda.synchronize()
        dist.barrier(group=cpu_group)
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        if i >= warmups:
            samples.append(start.elapsed_time(end))
    return statistics.median(samples)


def time_loop(fn, cpu_group, calls):
    """ms per call of `calls` back-to-back calls between two events (after a warm-up loop)."""
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    dist.barrier(group=cpu_group)
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(calls):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / calls


def exchange_counts(send_counts):
    """Rows this rank receives from each rank, given the rows it sends to each."""
    recv_counts = torch.empty_like(send_counts)
    dist.all_to_all_single(recv_counts, send_counts)
    return recv_counts


def normal_rows(rank, num_ranks, cpu_group, tokens):
    experts_per_rank = NUM_EXPERTS // num_ranks
    topk_idx = routing(tokens, num_ranks, rank)
    dest_rank = topk_idx // experts_per_rank  # [tokens, TOPK]
    is_in_rank = torch.zeros((tokens, num_ranks), dtype=torch.bool, device="cuda")
    is_in_rank.scatter_(1, dest_rank, True)
    # Token order grouped by destination rank: what a user gathers before the all-to-all.
    token_ids = torch.arange(tokens, device="cuda")
    order = torch.cat([token_ids[is_in_rank[:, r]] for r in range(num_ranks)])
    send_counts = is_in_rank.sum(dim=0).to(torch.int64)
    recv_counts = exchange_counts(send_counts)
    send_split, recv_split = send_counts.tolist(), recv_counts.tolist()
    num_send, num_recv = sum(send_split), sum(recv_split)

    x = torch.randn((tokens, HIDDEN), dtype=torch.bfloat16, device="cuda")
    x_fp8_rows = torch.randint(0, 120, (tokens, FP8_ROW_BYTES), dtype=torch.uint8, device="cuda")
    send_bf16 = x.index_select(0, order)
    send_fp8 = x_fp8_rows.index_select(0, order)
    recv_bf16 = torch.empty((num_recv, HIDDEN), dtype=torch.bfloat16, device="cuda")
    recv_fp8 = torch.empty((num_recv, FP8_ROW_BYTES), dtype=torch.uint8, device="cuda")
    back_bf16 = torch.empty((num_send, HIDDEN), dtype=torch.bfloat16, device="cuda")
    flush = torch.empty(256 * 1024 * 1024, dtype=torch.uint8, device="cuda")

    def dispatch(send, recv, pack_from=None):
        if pack_from is not None:
            torch.index_select(pack_from, 0, order, out=send)
        dist.all_to_all_single(recv, send, recv_split, send_split)

    def combine(reduce):
        dist.all_to_all_single(back_bf16, recv_bf16, send_split, recv_split)
        if reduce:
            out = torch.zeros((tokens, HIDDEN), dtype=torch.float32, device="cuda")
            out.index_add_(0, order, back_bf16.float())
            return out.to(torch.bfloat16)
        return None

    bytes_bf16 = num_recv * BF16_ROW_BYTES
    bytes_fp8 = num_recv * FP8_ROW_BYTES
    cases = [
        ("dispatch bf16", "a2a", lambda: dispatch(send_bf16, recv_bf16), bytes_bf16),
        ("dispatch fp8", "a2a", lambda: dispatch(send_fp8, recv_fp8), bytes_fp8),
        ("combine bf16", "a2a", lambda: combine(False), bytes_bf16),
        ("dispatch bf16", "a2a+pack", lambda: dispatch(send_bf16, recv_bf16, x), bytes_bf16),
        ("dispatch fp8", "a2a+pack", lambda: dispatch(send_fp8, recv_fp8, x_fp8_rows), bytes_fp8),
        ("combine bf16", "a2a+reduce", lambda: combine(True), bytes_bf16),
    ]
    rows = []
    for case, mode, fn, byte_count in cases:
        ms = time_samples(fn, cpu_group, WARMUPS, RUNS, flush)
        rows.append(dict(config="normal", case=f"EP{num_ranks} {case}", mode=mode, rank=rank, tokensPerRank=tokens,
                         numSendRows=num_send, numRecvRows=num_recv, bytes=byte_count, timeUs=ms * 1e3,
                         gbs=byte_count / (ms * 1e6)))
    return rows


def low_latency_rows(rank, num_ranks, cpu_group, tokens):
    experts_per_rank = NUM_EXPERTS // num_ranks
    topk_idx = routing(tokens, num_ranks, rank)
    dest_rank = (topk_idx // experts_per_rank).flatten()  # one row per (token, expert) pair
    send_counts = torch.bincount(dest_rank, minlength=num_ranks).to(torch.int64)
    recv_counts = exchange_counts(send_counts)
    send_split, recv_split = send_counts.tolist(), recv_counts.tolist()
    num_send, num_recv = sum(send_split), sum(recv_split)
    send_fp8 = torch.randint(0, 120, (num_send, FP8_ROW_BYTES), dtype=torch.uint8, device="cuda")
    recv_fp8 = torch.empty((num_recv, FP8_ROW_BYTES), dtype=torch.uint8, device="cuda")
    expert_out = torch.randn((num_recv, HIDDEN), dtype=torch.bfloat16, device="cuda")
    back = torch.empty((num_send, HIDDEN), dtype=torch.bfloat16, device="cuda")
    cases = [
        ("dispatch fp8", lambda: dist.all_to_all_single(recv_fp8, send_fp8, recv_split, send_split),
         num_send * FP8_ROW_BYTES, num_recv * FP8_ROW_BYTES),
        ("combine bf16", lambda: dist.all_to_all_single(back, expert_out, send_split, recv_split),
         num_recv * BF16_ROW_BYTES, num_send * BF16_ROW_BYTES),
    ]
    rows = []
    for case, fn, sent_bytes, received_bytes in cases:
        per_call = time_samples(fn, cpu_group, WARMUPS, LL_RUNS)
        back_to_back = time_loop(fn, cpu_group, LL_LOOP)
        rows.append(dict(config="low-latency", case=f"EP{num_ranks} {case}", mode="a2a", rank=rank, tokensPerRank=tokens,
                         numSendRows=num_send, numRecvRows=num_recv, sentBytes=sent_bytes, bytes=received_bytes,
                         latencyUs=per_call * 1e3, backToBackUs=back_to_back * 1e3,
                         gbs=received_bytes / (per_call * 1e6)))
    return rows


def run_rank(local_rank, num_ranks, port, opts, rows_path):
    torch.cuda.set_device(local_rank)
    init = dict(backend="nccl", init_method=f"tcp://127.0.0.1:{port}", world_size=num_ranks, rank=local_rank)
    try:
        dist.init_process_group(**init, device_id=torch.device("cuda", local_rank))
    except TypeError:
        dist.init_process_group(**init)
    cpu_group = dist.new_group(backend="gloo")
    rank = dist.get_rank()
    rows = normal_rows(rank, num_ranks, cpu_group, opts.tokens) + low_latency_rows(rank, num_ranks, cpu_group, opts.ll_tokens)
    gathered = [None] * num_ranks
    dist.all_gather_object(gathered, rows, group=cpu_group)
    if rank == 0:  # a file, not a queue: a child blocked on a full pipe would never join
        with open(rows_path, "w") as f:
            json.dump([row for part in gathered for row in part], f)
    dist.barrier(group=cpu_group)
    dist.destroy_process_group()


def peer_copy_rows(num_bytes):
    """Copy-engine peer copies between GPU 0 and 1: one direction, then both directions at once."""
    if torch.cuda.device_count() < 2:
        return []
    src = [torch.empty(num_bytes, dtype=torch.uint8, device=f"cuda:{d}").fill_(d + 1) for d in (0, 1)]
    dst = [torch.empty(num_bytes, dtype=torch.uint8, device=f"cuda:{d}") for d in (0, 1)]
    streams = [torch.cuda.Stream(device=d) for d in (0, 1)]
    rows = []

    def run(directions):
        samples = {d: [] for d in directions}
        for i in range(WARMUPS + RUNS):
            for d in (0, 1):
                torch.cuda.synchronize(d)
            events = {}
            for d in directions:  # d pushes its src into the other GPU's dst, on its own stream
                with torch.cuda.device(d), torch.cuda.stream(streams[d]):
                    start = torch.cuda.Event(enable_timing=True)
                    end = torch.cuda.Event(enable_timing=True)
                    start.record(streams[d])
                    dst[1 - d].copy_(src[d], non_blocking=True)
                    end.record(streams[d])
                    events[d] = (start, end)
            for d in directions:
                events[d][1].synchronize()
                if i >= WARMUPS:
                    samples[d].append(events[d][0].elapsed_time(events[d][1]))
        return {d: statistics.median(s) for d, s in samples.items()}

    for label, directions in (("one direction", (0,)), ("both directions at once", (0, 1))):
        for d, ms in run(directions).items():
            rows.append(dict(config="peer copy (copy engine)", case=f"GPU{d}->GPU{1 - d}, {label}", bytes=num_bytes,
                             timeUs=ms * 1e3, gbs=num_bytes / (ms * 1e6)))
    return rows


def print_tables(rows):
    normal = [r for r in rows if r["config"] == "normal"]
    low = [r for r in rows if r["config"] == "low-latency"]
    peer = [r for r in rows if r["config"].startswith("peer copy")]
    print("\nNCCL all_to_all_single, normal config (GB/s = bytes received / time)")
    print("| case | mode | rank | recv rows | MB received | time (us) | GB/s |")
    print("|---|---|---|---|---|---|---|")
    for r in normal:
        print(f"| {r['case']} | {r['mode']} | {r['rank']} | {r['numRecvRows']} | {r['bytes'] / 1e6:.1f} | {r['timeUs']:.1f} | {r['gbs']:.1f} |")
    print("\nNCCL all_to_all_single, low-latency config (one row per (token, expert) pair)")
    print("| case | rank | send rows | recv rows | KB received | latency (us) | back-to-back (us) | GB/s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in low:
        print(f"| {r['case']} | {r['rank']} | {r['numSendRows']} | {r['numRecvRows']} | {r['bytes'] / 1e3:.1f} | "
              f"{r['latencyUs']:.1f} | {r['backToBackUs']:.1f} | {r['gbs']:.1f} |")
    if peer:
        print("\nPeer copy through the copy engines (torch copy_ across GPUs)")
        print("| case | MB | time (us) | GB/s |")
        print("|---|---|---|---|")
        for r in peer:
            print(f"| {r['case']} | {r['bytes'] / 1e6:.1f} | {r['timeUs']:.1f} | {r['gbs']:.1f} |")


def nccl_version():
    version = torch.cuda.nccl.version()
    return ".".join(str(v) for v in version) if isinstance(version, tuple) else str(version)


def main():
    parser = argparse.ArgumentParser(description="NCCL all-to-all on the bytes of our dispatch/combine")
    parser.add_argument("--num-processes", type=int, default=0, help="ranks, one per GPU (default: every GPU)")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--ll-tokens", type=int, default=128)
    parser.add_argument("--out", default="")
    opts = parser.parse_args()
    num_ranks = opts.num_processes or torch.cuda.device_count()
    if num_ranks < 2:
        sys.exit(f"nccl_alltoall.py needs 2 or more GPUs (one rank per GPU); found {torch.cuda.device_count()}")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        rows_path = os.path.join(tmp, "rows.json")
        mp.spawn(run_rank, args=(num_ranks, port, opts, rows_path), nprocs=num_ranks, join=True)
        with open(rows_path) as f:
            rows = json.load(f)
    # The ceiling on the bytes rank 0 received in the bf16 dispatch (EP2: about 117 MB).
    dispatch_bytes = next((r["bytes"] for r in rows if r["config"] == "normal" and r["rank"] == 0
                           and r["case"].endswith("dispatch bf16")), 117 * 10**6)
    rows += peer_copy_rows(int(dispatch_bytes))
    print_tables(rows)
    print(f"\n{len(rows)} rows in {time.time() - started:.0f} s")
    if opts.out:
        body = dict(name="nccl_alltoall", device=torch.cuda.get_device_name(0), numGpus=torch.cuda.device_count(),
                    numRanks=num_ranks, date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    command=" ".join(sys.argv), torch=torch.__version__,
                    nccl=nccl_version(),
                    env={k: os.environ.get(k) for k in ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST", "NVSHMEM_DISABLE_NVLS")},
                    rows=rows)
        with open(opts.out, "w") as f:
            json.dump(body, f, indent=1)
        print(f"wrote {opts.out}")


if __name__ == "__main__":
    main()
