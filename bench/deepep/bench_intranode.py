"""DeepEP V1's intranode kernels timed exactly as bench/normal.ts times ours (issue 5's method).

    PYTHONPATH=.deepep python3 bench/deepep/bench_intranode.py [--num-processes N] [--sms 24,20,32]
        [--tokens 4096] [--out FILE.json]

One process per GPU (torch.multiprocessing, NCCL + a gloo group for host barriers), DeepEP's own
config: 4096 tokens per rank, hidden 7168, top-8 of 256 experts, random routing (top-k of
|randn|+1 scores). Timed: cached dispatch (from the handle) of bf16 and of fp8 (e4m3 + f32 scale
per 128 channels), and combine of the dispatched bf16 tensor. Each sample: flush L2 (256 MB
write), synchronize, host barrier of all ranks, CUDA events around the one call; median of 49
samples after 20 warm-ups. GB/s = received tokens x 7168 x 2 bytes / time (fp8: x (1 + 4/128) / 2).
A sweep over SM counts (--sms, the first is the headline: 24 = what bench/normal.ts uses) and NVL
chunk sizes (DeepEP's test_intranode.py ranges) keeps the best chunk per (case, SM count); DeepEP's
default config for the rank count is timed too. Prints a markdown table; writes JSON (--out).
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
NVL_RECV_TOKENS = 256  # DeepEP's test_intranode.py value for num_max_nvl_chunked_recv_tokens
DISPATCH_CHUNKS = tuple(range(4, 33, 2))
COMBINE_CHUNKS = tuple(range(1, 17))
FP8_FACTOR = (1 + 4 / 128) / 2


def import_deep_ep():
    """deep_ep from PYTHONPATH, else from $DEEPEP_DIR or .deepep next to the repo root."""
    try:
        import deep_ep  # noqa: F401
    except ImportError:
        here = os.path.dirname(os.path.abspath(__file__))
        source = os.environ.get("DEEPEP_DIR", os.path.join(here, "..", "..", ".deepep"))
        sys.path.insert(0, os.path.abspath(source))
    import deep_ep
    return deep_ep


def per_token_cast_to_fp8(x):
    """e4m3 values and f32 scales per 128 channels (amax / 448), as DeepEP's tests make them."""
    tokens, hidden = x.shape
    blocks = x.view(tokens, hidden // 128, 128).float()
    amax = blocks.abs().amax(dim=2).clamp(min=1e-4)
    values = (blocks * (448.0 / amax.unsqueeze(2))).to(torch.float8_e4m3fn).view(tokens, hidden)
    return values, amax / 448.0


# Spin cycles queued before each timed call, as bench/normal.ts does (--launch-slack-us): it
# absorbs the ranks' host launch skew so that both libraries are timed the same way.
SLACK_CYCLES = 0


def calibrate_slack(slack_us):
    """Cycles of torch.cuda._sleep that take about slack_us on this GPU (measured, not assumed)."""
    global SLACK_CYCLES
    if slack_us <= 0:
        return
    probe = 1_000_000
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(probe)
    start.record()
    torch.cuda._sleep(probe)
    end.record()
    end.synchronize()
    SLACK_CYCLES = int(probe * (slack_us / 1000.0) / max(start.elapsed_time(end), 1e-6))


def time_call(fn, flush, cpu_group):
    """Median ms of `fn` over RUNS samples after WARMUPS, each after an L2 flush and a barrier."""
    samples = []
    for i in range(WARMUPS + RUNS):
        flush.fill_(i & 0xFF)
        torch.cuda.synchronize()
        dist.barrier(group=cpu_group)
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        if SLACK_CYCLES > 0:
            torch.cuda._sleep(SLACK_CYCLES)
        start.record()
        result = fn()
        end.record()
        end.synchronize()
        del result
        if i >= WARMUPS:
            samples.append(start.elapsed_time(end))
    return statistics.median(samples)


def run_rank(local_rank, num_ranks, port, opts, rows_path):
    torch.cuda.set_device(local_rank)
    init = dict(backend="nccl", init_method=f"tcp://127.0.0.1:{port}", world_size=num_ranks, rank=local_rank)
    try:
        dist.init_process_group(**init, device_id=torch.device("cuda", local_rank))
    except TypeError:  # older torch without device_id
        dist.init_process_group(**init)
    cpu_group = dist.new_group(backend="gloo")
    rank = dist.get_rank()
    deep_ep = import_deep_ep()

    sms_list = [int(s) for s in opts.sms.split(",")]
    calibrate_slack(opts.launch_slack_us)
    configs = [deep_ep.Config(s, c, NVL_RECV_TOKENS) for s in sms_list for c in DISPATCH_CHUNKS + COMBINE_CHUNKS]
    hint = max(c.get_nvl_buffer_size_hint(HIDDEN * 2, num_ranks) for c in configs)
    num_nvl_bytes = max(int(2e9), hint)
    buffer = deep_ep.Buffer(dist.group.WORLD, num_nvl_bytes, 0, low_latency_mode=False, num_qps_per_rank=1,
                            explicitly_destroy=True)
    rows = []
    try:
        torch.manual_seed(1234 + rank)
        x = torch.randn((opts.tokens, HIDDEN), dtype=torch.bfloat16, device="cuda")
        x_fp8, x_scales = per_token_cast_to_fp8(x)
        x_scales = x_scales.T.contiguous().T  # DeepEP's tests pass the scales column-major
        scores = torch.randn((opts.tokens, NUM_EXPERTS), dtype=torch.float32, device="cuda").abs() + 1
        topk_idx = torch.topk(scores, TOPK, dim=-1, largest=True, sorted=False)[1].to(deep_ep.topk_idx_t)
        topk_weights = torch.ones((opts.tokens, TOPK), dtype=torch.float32, device="cuda")
        flush = torch.empty(256 * 1024 * 1024, dtype=torch.uint8, device="cuda")

        num_tokens_per_rank, _, num_tokens_per_expert, is_token_in_rank, _ = buffer.get_dispatch_layout(topk_idx, NUM_EXPERTS)
        layout_ms = time_call(lambda: buffer.get_dispatch_layout(topk_idx, NUM_EXPERTS), flush, cpu_group)

        def make_handle(sms):
            # A handle's channel layout follows the SM count of the dispatch that made it (DeepEP
            # asserts on a cached dispatch with another count: seen 2026-11-23), so each SM count of
            # the sweep gets its own handle.
            out = buffer.dispatch(
                x=x, num_tokens_per_rank=num_tokens_per_rank, is_token_in_rank=is_token_in_rank,
                num_tokens_per_expert=num_tokens_per_expert, topk_idx=topk_idx, topk_weights=topk_weights,
                config=deep_ep.Config(sms, 8, NVL_RECV_TOKENS))
            torch.cuda.synchronize()
            return out[0], out[4]

        recv_x, handle = make_handle(sms_list[0])
        num_recv = recv_x.size(0)
        bytes_bf16 = num_recv * HIDDEN * 2

        def add_row(case, sms, chunk, ms, byte_count, config_kind):
            gbs = byte_count / (ms * 1e6)
            rows.append(dict(case=f"EP{num_ranks} {case}", rank=rank, numSMs=sms, nvlChunk=chunk, config=config_kind,
                             numRecvTokens=num_recv, timeUs=ms * 1e3, gbs=gbs, gbsPerSM=gbs / sms, layoutUs=layout_ms * 1e3))

        dispatch_inputs = (("dispatch bf16", x, bytes_bf16), ("dispatch fp8", (x_fp8, x_scales), bytes_bf16 * FP8_FACTOR))
        for sms in sms_list:
            recv_x, handle = make_handle(sms)
            for case, current_x, byte_count in dispatch_inputs:
                for chunk in DISPATCH_CHUNKS:
                    config = deep_ep.Config(sms, chunk, NVL_RECV_TOKENS)
                    ms = time_call(lambda: buffer.dispatch(x=current_x, handle=handle, config=config), flush, cpu_group)
                    add_row(case, sms, chunk, ms, byte_count, "sweep")
            for chunk in COMBINE_CHUNKS:
                config = deep_ep.Config(sms, chunk, NVL_RECV_TOKENS)
                ms = time_call(lambda: buffer.combine(x=recv_x, handle=handle, config=config), flush, cpu_group)
                add_row("combine bf16", sms, chunk, ms, bytes_bf16, "sweep")
        # DeepEP's default configs for this rank count, at the headline SM count.
        deep_ep.Buffer.set_num_sms(sms_list[0])
        recv_x, handle = make_handle(sms_list[0])
        for case, current_x, byte_count in dispatch_inputs:
            config = deep_ep.Buffer.get_dispatch_config(num_ranks)
            ms = time_call(lambda: buffer.dispatch(x=current_x, handle=handle, config=config), flush, cpu_group)
            add_row(case, sms_list[0], None, ms, byte_count, "default")  # Config hides its fields from Python
        config = deep_ep.Buffer.get_combine_config(num_ranks)
        ms = time_call(lambda: buffer.combine(x=recv_x, handle=handle, config=config), flush, cpu_group)
        add_row("combine bf16", sms_list[0], None, ms, bytes_bf16, "default")
    finally:
        torch.cuda.synchronize()
        dist.barrier(group=cpu_group)
        buffer.destroy()
    gathered = [None] * num_ranks
    dist.all_gather_object(gathered, rows, group=cpu_group)
    if rank == 0:  # a file, not a queue: a child blocked on a full pipe would never join
        with open(rows_path, "w") as f:
            json.dump([row for part in gathered for row in part], f)
    dist.barrier(group=cpu_group)
    dist.destroy_process_group()


def best_rows(rows):
    """Per (case, rank, numSMs): the sweep row with the lowest time."""
    best = {}
    for row in rows:
        if row["config"] != "sweep":
            continue
        key = (row["case"], row["rank"], row["numSMs"])
        if key not in best or row["timeUs"] < best[key]["timeUs"]:
            best[key] = row
    return [best[k] for k in sorted(best, key=lambda k: (k[2], k[0], k[1]))]


def print_table(title, rows):
    print(f"\n{title}")
    print("| case | rank | SMs | NVL chunk | config | recv tokens | time (us) | GB/s | GB/s per SM | layout (us) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        chunk = "-" if r["nvlChunk"] is None else r["nvlChunk"]
        print(f"| {r['case']} | {r['rank']} | {r['numSMs']} | {chunk} | {r['config']} | {r['numRecvTokens']} | "
              f"{r['timeUs']:.1f} | {r['gbs']:.1f} | {r['gbsPerSM']:.2f} | {r['layoutUs']:.1f} |")


def main():
    parser = argparse.ArgumentParser(description="DeepEP V1 intranode dispatch/combine, timed as bench/normal.ts")
    parser.add_argument("--num-processes", type=int, default=0, help="ranks, one per GPU (default: every GPU)")
    parser.add_argument("--sms", default="24,20,32", help="SM counts to sweep, even; the first is the headline (24)")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--launch-slack-us", type=float, default=300.0,
                        help="GPU spin queued before each timed call, as bench/normal.ts (0 = off)")
    parser.add_argument("--out", default="", help="JSON file to write")
    opts = parser.parse_args()
    if any(int(s) % 2 for s in opts.sms.split(",")):
        sys.exit("--sms: DeepEP needs even SM counts")
    num_ranks = opts.num_processes or torch.cuda.device_count()
    if num_ranks < 2:
        sys.exit(f"bench_intranode.py needs 2 or more GPUs (one rank per GPU); found {torch.cuda.device_count()}")
    import_deep_ep()  # fail here, clearly, if the extension is missing
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        rows_path = os.path.join(tmp, "rows.json")
        mp.spawn(run_rank, args=(num_ranks, port, opts, rows_path), nprocs=num_ranks, join=True)
        with open(rows_path) as f:
            rows = json.load(f)
    best = best_rows(rows)
    defaults = [r for r in rows if r["config"] == "default"]
    device = torch.cuda.get_device_name(0)
    print_table(f"DeepEP V1 intranode, {device} x{num_ranks}, one rank per GPU, {opts.tokens} tokens, hidden {HIDDEN}, "
                f"top-{TOPK} of {NUM_EXPERTS}: best NVL chunk per SM count", best)
    print_table("DeepEP V1 default config (Buffer.get_dispatch_config / get_combine_config)", defaults)
    print(f"\n{len(rows)} timed configurations in {time.time() - started:.0f} s")
    if opts.out:
        body = dict(name="deepep_intranode", device=device, numGpus=torch.cuda.device_count(), numRanks=num_ranks,
                    date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), command=" ".join(sys.argv),
                    torch=torch.__version__, deepepCommit=read_commit(), headlineSMs=int(opts.sms.split(",")[0]),
                    method="cached dispatch / combine, CUDA events, median of 49 after 20 warm-ups, L2 flushed, host barrier",
                    best=best, defaults=defaults, rows=rows)
        with open(opts.out, "w") as f:
            json.dump(body, f, indent=1)
        print(f"wrote {opts.out}")


def read_commit():
    here = os.path.dirname(os.path.abspath(__file__))
    path = os.path.join(os.environ.get("DEEPEP_DIR", os.path.join(here, "..", "..", ".deepep")), "DEEPEP_COMMIT")
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


if __name__ == "__main__":
    main()
