#!/usr/bin/env python3
"""Quantiles of Prometheus histograms from a /metrics text page, as the upper bound of the bucket that holds them
(conservative: the true value is at most this).

Usage: curl -s http://127.0.0.1:8000/metrics | scripts/metrics-quantile.py ferrite_router_token_seconds [0.5 0.99]
"""
import re
import sys
from collections import defaultdict

name = sys.argv[1]
qs = [float(q) for q in sys.argv[2:]] or [0.5, 0.9, 0.99]
series = defaultdict(list)  # labels without `le` -> [(le, cumulative count)]
pat = re.compile(r"^" + re.escape(name) + r'_bucket\{(.*)\} (\S+)$')
for line in sys.stdin:
    m = pat.match(line.strip())
    if not m:
        continue
    labels = dict(kv.split("=", 1) for kv in re.findall(r'\w+="[^"]*"', m.group(1)))
    le = labels.pop("le").strip('"')
    key = ",".join(f"{k}={v}" for k, v in sorted(labels.items()))
    series[key].append((float("inf") if le == "+Inf" else float(le), float(m.group(2))))
if not series:
    sys.exit(f"no histogram named {name}")
for key, buckets in sorted(series.items()):
    buckets.sort()
    total = buckets[-1][1]
    if total == 0:
        continue
    parts = []
    for q in qs:
        bound = next(le for le, c in buckets if c >= q * total)
        parts.append(f"p{q * 100:g} <= {bound * 1e3:g} ms")
    print(f"{name}{{{key}}} n={total:.0f}: " + ", ".join(parts))
