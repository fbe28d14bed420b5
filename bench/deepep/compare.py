"""Side-by-side table of one multi-GPU batch: ours vs DeepEP V1 vs NCCL all-to-all vs the copy ceilings.

    python3 bench/deepep/compare.py --work DIR --results bench/results --out OUTDIR

Reads what the batch left (any of them may be missing; its cells then read "-"):
  DIR/deepep_intranode.json   bench/deepep/bench_intranode.py
  DIR/nccl_alltoall.json      bench/nccl_alltoall.py
  RESULTS/normal.json         bench/normal.ts (rows of mode "processes": one rank per GPU here)
  RESULTS/copy.json           bench/copy.ts (rows "peer NVLink")
  RESULTS/low_latency.json    bench/low_latency.ts (rows "deepep-decode")
Writes OUTDIR/results.json (all of the above merged, plus the comparison rows) and appends the
markdown tables to OUTDIR/summary.md. GB/s per case are the mean over ranks of each rank's GB/s.
"""
import argparse
import json
import os
import statistics


def load(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as err:
        print(f"compare: {path}: {err}")
        return None


def mean(values):
    values = [v for v in values if isinstance(v, (int, float))]
    return statistics.fmean(values) if values else None


def fmt(value, digits=1):
    return "-" if value is None else f"{value:.{digits}f}"


def ratio(a, b):
    return a / b if a is not None and b else None


def normal_comparison(ours, deepep, nccl, copy):
    cases = ("dispatch bf16", "dispatch fp8", "combine bf16")
    num_ranks = (deepep or {}).get("numRanks") or (nccl or {}).get("numRanks") or 2
    headline = (deepep or {}).get("headlineSMs", 24)
    ours_rows = [r for r in (ours or {}).get("rows", []) if r.get("mode") == "processes" and r.get("numRanks") == num_ranks]
    peer = {r.get("method"): r.get("gbps") for r in (copy or {}).get("rows", []) if r.get("case") == "peer NVLink"}
    ce_both = mean([r["gbs"] for r in (nccl or {}).get("rows", []) if r.get("config", "").startswith("peer copy")
                    and "both directions" in r.get("case", "")])
    kernel_push = next((v for k, v in peer.items() if k and k.startswith("kernel push 0->1")), None)
    # Both GPUs pushing at once (bench/copy.ts), per direction: the SM-driven ceiling of EP2 traffic.
    kernel_both = next((v for k, v in peer.items() if k and k.startswith("kernel push both")), None)
    best_both = max([v for v in (ce_both, kernel_both) if v is not None], default=None)
    rows = []
    for case in cases:
        name = f"EP{num_ranks} {case}"
        our = [r for r in ours_rows if r.get("case") == name]
        best = [r for r in (deepep or {}).get("best", []) if r["case"] == name]
        at_headline = mean([r["gbs"] for r in best if r["numSMs"] == headline])
        by_sms = {}
        for r in best:
            by_sms.setdefault(r["numSMs"], []).append(r["gbs"])
        best_sms, best_any = max(((s, mean(v)) for s, v in by_sms.items()), key=lambda p: p[1], default=(None, None))
        default = mean([r["gbs"] for r in (deepep or {}).get("defaults", []) if r["case"] == name])
        a2a = mean([r["gbs"] for r in (nccl or {}).get("rows", []) if r.get("config") == "normal" and r["case"] == name and r["mode"] == "a2a"])
        a2a_user = mean([r["gbs"] for r in (nccl or {}).get("rows", []) if r.get("config") == "normal" and r["case"] == name and r["mode"] != "a2a"])
        our_gbs = mean([r.get("gbs") for r in our])
        rows.append(dict(case=name, oursGBs=our_gbs, oursSMs=our[0].get("numSMs") if our else None,
                         oursUs=mean([r.get("timeUs") for r in our]),
                         deepepGBsAtHeadlineSMs=at_headline, headlineSMs=headline, ratioToDeepEP=ratio(our_gbs, at_headline),
                         deepepBestGBs=best_any, deepepBestSMs=best_sms, deepepDefaultGBs=default,
                         ncclA2aGBs=a2a, ncclWithPackGBs=a2a_user, ratioToNccl=ratio(our_gbs, a2a),
                         peerKernelPushGBs=kernel_push, peerCopyEngineBothGBs=ce_both,
                         peerKernelBothGBs=kernel_both, ratioToPeerBoth=ratio(our_gbs, best_both)))
    return rows


def low_latency_comparison(ours, nccl):
    num_ranks = (nccl or {}).get("numRanks") or 2
    ours_rows = [r for r in (ours or {}).get("rows", []) if r.get("case") == "deepep-decode" and r.get("ranks") == num_ranks]
    rows = []
    for op, case in (("dispatch", "dispatch fp8"), ("combine", "combine bf16")):
        nccl_rows = [r for r in (nccl or {}).get("rows", []) if r.get("config") == "low-latency" and r["case"] == f"EP{num_ranks} {case}"]
        per_call = mean([r["latencyUs"] for r in nccl_rows])
        back_to_back = mean([r["backToBackUs"] for r in nccl_rows])
        events = mean([r.get("latencyUs") for r in ours_rows if r.get("op") == op and r.get("mode") == "events"])
        graph = mean([r.get("latencyUs") for r in ours_rows if r.get("op") == op and r.get("mode") == "graph"])
        rows.append(dict(case=f"EP{num_ranks} {case} (128 tokens)", oursEventsUs=events, oursGraphUs=graph,
                         ncclPerCallUs=per_call, ncclBackToBackUs=back_to_back,
                         ratioGraphToNcclBackToBack=ratio(graph, back_to_back), ratioEventsToNcclPerCall=ratio(events, per_call)))
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", required=True)
    parser.add_argument("--results", default="bench/results")
    parser.add_argument("--out", required=True)
    opts = parser.parse_args()
    deepep = load(os.path.join(opts.work, "deepep_intranode.json"))
    nccl = load(os.path.join(opts.work, "nccl_alltoall.json"))
    ours = load(os.path.join(opts.results, "normal.json"))
    copy = load(os.path.join(opts.results, "copy.json"))
    low = load(os.path.join(opts.results, "low_latency.json"))
    normal_rows = normal_comparison(ours, deepep, nccl, copy)
    ll_rows = low_latency_comparison(low, nccl)

    lines = ["", "## Normal kernels, one rank per GPU (GB/s = bytes received / time, mean over ranks)", "",
             "| case | ours GB/s | ours us | DeepEP GB/s (same SMs) | ratioToDeepEP | DeepEP best GB/s (SMs) | DeepEP default cfg | "
             "NCCL a2a GB/s | NCCL a2a+pack/reduce | ours/NCCL | peer kernel push 1-dir | peer copy-engine both dirs | peer kernel both dirs | ours/best peer both |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in normal_rows:
        lines.append(
            f"| {r['case']} | {fmt(r['oursGBs'])} | {fmt(r['oursUs'])} | {fmt(r['deepepGBsAtHeadlineSMs'])} ({r['headlineSMs']}) | "
            f"{fmt(r['ratioToDeepEP'], 2)} | {fmt(r['deepepBestGBs'])} ({r['deepepBestSMs'] or '-'}) | {fmt(r['deepepDefaultGBs'])} | "
            f"{fmt(r['ncclA2aGBs'])} | {fmt(r['ncclWithPackGBs'])} | {fmt(r['ratioToNccl'], 2)} | {fmt(r['peerKernelPushGBs'])} | "
            f"{fmt(r['peerCopyEngineBothGBs'])} | {fmt(r['peerKernelBothGBs'])} | {fmt(r['ratioToPeerBoth'], 2)} |")
    lines += ["", "Goals (issue 8): ratioToDeepEP >= 1.1; >= 85% of the peer-copy ceiling (at EP2 about half of the "
              "received bytes are the rank's own tokens, copied locally, so the NVLink ceiling is not the whole story).",
              "", "## Low-latency, 128 tokens per rank (DeepEP's LL kernels need an RDMA NIC: NCCL is the side-by-side)", "",
              "| case | ours events us | ours graph us | NCCL per call us | NCCL back-to-back us | ours graph / NCCL b2b | ours events / NCCL per call |",
              "|---|---|---|---|---|---|---|"]
    for r in ll_rows:
        lines.append(f"| {r['case']} | {fmt(r['oursEventsUs'])} | {fmt(r['oursGraphUs'])} | {fmt(r['ncclPerCallUs'])} | "
                     f"{fmt(r['ncclBackToBackUs'])} | {fmt(r['ratioGraphToNcclBackToBack'], 2)} | {fmt(r['ratioEventsToNcclPerCall'], 2)} |")
    lines.append("")
    text = "\n".join(lines)
    print(text)
    os.makedirs(opts.out, exist_ok=True)
    with open(os.path.join(opts.out, "summary.md"), "a") as f:
        f.write(text + "\n")
    merged = dict(comparison=dict(normal=normal_rows, lowLatency=ll_rows), deepep=deepep, nccl=nccl, normal=ours, copy=copy,
                  lowLatency=low)
    with open(os.path.join(opts.out, "results.json"), "w") as f:
        json.dump(merged, f, indent=1)
    print(f"wrote {os.path.join(opts.out, 'results.json')}")


if __name__ == "__main__":
    main()
