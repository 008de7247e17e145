#!/usr/bin/env python3
"""Generate hydra's Grafana dashboards (grafana/*.json) from the panel lists below.

Run `python3 grafana/build.py` after editing; commit the JSON. Every `expr` here is evaluated
against a real Prometheus scraping a real node by `tests/observability.rs`, which fails if any
expression is invalid or returns no series. Template variables: `$node` (the scrape instance)
and `$head` (head index).
"""
import json
import pathlib

DS = {"type": "prometheus", "uid": "prometheus"}
N = 'instance=~"$node"'
NH = 'instance=~"$node",head=~"$head"'
RI = "$__rate_interval"


def panel(title, exprs, unit="short", kind="timeseries", desc=""):
    return {"title": title, "exprs": exprs, "unit": unit, "kind": kind, "desc": desc}


OVERVIEW = [
    ("Fleet", [
        panel("Heads up", [(f"count(hydra_head_connections{{{NH}}})", "heads")], kind="stat",
              desc="Heads exporting metrics. Compare with the heads you configured."),
        panel("Connections per head", [(f"hydra_head_connections{{{NH}}}", "{{instance}} head {{head}}")]),
        panel("Routing table peers", [(f"hydra_routing_table_peers{{{N}}}", "{{instance}}")],
              desc="The process-wide routing table every head answers FIND_NODE from (routing.max_peers bounds it)."),
        panel("Routing table changes/s", [(f"sum by (change) (rate(hydra_routing_table_changes_total{{{N}}}[{RI}]))", "{{change}}")], "ops",
              desc="evicted/refused: the table is at routing.max_peers or max_bytes; dropped_update: the heads' feed was full."),
        panel("Unique remote peers (estimate)", [(f"hydra_kad_unique_peers_estimate{{{N}}}", "{{instance}}")],
              desc="HyperLogLog estimate of distinct peers that opened kad streams since start."),
    ]),
    ("Requests", [
        panel("Requests/s by type", [(f"sum by (type) (rate(hydra_kad_requests_total{{{NH}}}[{RI}]))", "{{type}}")], "reqps"),
        panel("Requests/s by outcome", [(f"sum by (outcome) (rate(hydra_kad_requests_total{{{NH}}}[{RI}]))", "{{outcome}}")], "reqps"),
        panel("Shed requests/s by type", [(f'sum by (type) (rate(hydra_kad_requests_total{{{NH},outcome="shed"}}[{RI}]))', "{{type}}")], "reqps",
              desc="Requests deliberately not served in full. Rising together with datastore latency means the datastore is the bottleneck."),
        panel("Request latency p99 by type", [(f"histogram_quantile(0.99, sum by (type, le) (rate(hydra_kad_request_duration_seconds_bucket{{{N}}}[{RI}])))", "{{type}}")], "s"),
        panel("Request latency p50 by type", [(f"histogram_quantile(0.5, sum by (type, le) (rate(hydra_kad_request_duration_seconds_bucket{{{N}}}[{RI}])))", "{{type}}")], "s"),
        panel("Time in the node p99 by type (new stream to first reply)", [(f"histogram_quantile(0.99, sum by (type, le) (rate(hydra_kad_stream_sojourn_seconds_bucket{{{N}}}[{RI}])))", "{{type}}")], "s",
              desc="From a new stream's arrival in the intake to its first reply written: dispatch, the request slot, reading, serving and writing. Request latency above starts at the decoded request. Past its CPU capacity this is where clients wait (docs/benchmarks.md); FIND_NODE never waits for the datastore, so its line is the node's own queueing."),
    ]),
    ("Load tiers", [
        panel("Load tier", [(f"max by (instance) (hydra_load_tier{{{N}}})", "{{instance}}")],
              desc="0 normal, 1 degrade (far keys from cache only), 2 refuse (closer peers only, ADD_PROVIDER dropped), 3 peak (new streams reset). GET /v1/status shows why."),
        panel("Sheds/s by tier and reason", [(f"sum by (tier, reason) (rate(hydra_load_shed_total{{{N}}}[{RI}]))", "{{tier}} {{reason}}")], "ops",
              desc="Every request not served in full. reason=tier: refused by the tier; cache_only: degrade miss; peer_rate: per-peer limit; others: the provider manager's bounds and deadlines."),
        panel("Latency signals (ms)", [(f'hydra_load_signal{{{N},signal=~".*_ms"}}', "{{instance}} {{signal}}")],
              desc="p99 over load.window. Compare with hydra_load_threshold{tier=\"degrade\"} (50 ms) and refuse (250 ms)."),
        panel("Fill signals (ratio)", [(f'hydra_load_signal{{{N},signal=~".*_ratio"}}', "{{instance}} {{signal}}")], "percentunit"),
        panel("CPU used of allowed", [(f"hydra_cpu_busy_ratio{{{N}}}", "{{instance}}")], "percentunit",
              desc="The process's CPU over the last second ÷ hydra_cpu_allowance_cores (its cgroup's CFS quota, else its CPUs). Near 100 % the node has no spare CPU whatever runtime_lag_ms says: under a quota the work waits in the sockets first."),
        panel("Admission while the CPU is short", [(f"hydra_load_admission_streams_per_second{{{N}}}", "new streams/s {{instance}}"), (f"hydra_load_admission_connections_per_second{{{N}}}", "new connections/s {{instance}}")],
              desc="Rates the admission gates let in while runtime_lag_ms is at load.admission_lag_ms; -1: open (everything admitted). New connections at 0: shedding, or no room — the TCP listeners are then closed (next panel)."),
        panel("Connections turned away", [(f"sum(rate(hydra_kad_connections_shed_total{{{N}}}[{RI}]))", "closed by shedding/s"), (f"sum(rate(hydra_kad_connections_refused_total{{{N}}}[{RI}]))", "refused before handshake/s"), (f"sum(hydra_kad_listeners_closed{{{N}}})", "TCP listeners closed now"), (f"sum(hydra_load_shedding_connections{{{N}}})", "processes shedding")],
              desc="While no connection is admitted the TCP listeners are closed and the kernel refuses dials (not counted here: the node never sees them). A closed listener that cannot be bound again shows in hydra_kad_listener_reopen_failures_total."),
        panel("Tier changes/s", [(f"sum by (to) (rate(hydra_load_tier_transitions_total{{{N}}}[{RI}]))", "to {{to}}")], "ops",
              desc="Frequent changes mean thresholds sit at the operating point; raise them or load.min_dwell."),
        panel("Statement budget wait p99", [(f"histogram_quantile(0.99, sum by (le) (rate(hydra_load_statement_budget_wait_seconds_bucket{{{N}}}[{RI}])))", "p99")], "s",
              desc="Time flushes and lookups wait for load.datastore_statements_per_second. Sustained waits: the budget is the limit."),
    ]),
    ("Streams and shedding", [
        panel("Inbound stream events/s", [(f"sum by (event) (rate(hydra_kad_streams_total{{{N}}}[{RI}]))", "{{event}}")], "ops",
              desc="queue_full: the intake queue was full and new streams were reset; queue_wait: a stream waited longer than load.stream_queue_max_wait; refused: tier peak; evicted: an idle stream closed for a newer one at a stream cap; peer_limit: a cap full of busy streams reset a new one; slot_wait: no request slot in time."),
        panel("Open streams and requests in flight", [(f"hydra_kad_active_streams{{{N}}}", "open {{instance}}"), (f"hydra_kad_requests_in_flight{{{N}}}", "in flight {{instance}}")],
              desc="Open streams cost memory (limits.max_open_streams); requests in flight hold one of limits.max_concurrent_requests slots. Many open, few in flight: idle streams, as go clients keep them."),
        panel("Provider sheds/s by reason", [(f"sum by (reason) (rate(hydra_providers_shed_total{{{N}}}[{RI}]))", "{{reason}}")], "ops"),
    ]),
    ("Datastore", [
        panel("Datastore latency p99 by operation", [(f"histogram_quantile(0.99, sum by (op, le) (rate(hydra_datastore_operation_duration_seconds_bucket{{{N}}}[{RI}])))", "{{op}}")], "s",
              desc="Look here first when requests are shed: every datastore call is timed here."),
        panel("Datastore errors/s", [(f"sum by (op) (rate(hydra_datastore_errors_total{{{N}}}[{RI}]))", "{{op}}")], "ops"),
        panel("Write buffer entries", [(f"hydra_providers_write_buffer_entries{{{N}}}", "{{instance}}")]),
        panel("Cache hit ratio", [(f'sum(rate(hydra_providers_cache_lookups_total{{{N},result!="miss"}}[{RI}])) / clamp_min(sum(rate(hydra_providers_cache_lookups_total{{{N}}}[{RI}])), 1e-9)', "hit ratio")], "percentunit"),
    ]),
    ("Records", [
        panel("Provider records (estimate)", [(f"max(hydra_providers_records_estimate{{{N}}})", "records")], kind="stat"),
        panel("Peers with addresses (estimate)", [(f"max(hydra_providers_peers_estimate{{{N}}})", "peers")], kind="stat"),
        panel("GC leaseholders", [(f"sum(hydra_providers_gc_leader{{{N}}})", "leaders")], kind="stat",
              desc="Must be 1 across the fleet."),
        panel("Expired rows deleted/s", [(f"sum(rate(hydra_providers_gc_deleted_rows_total{{{N}}}[{RI}]))", "rows/s")], "ops"),
    ]),
    ("Process", [
        panel("Resident memory", [(f"process_resident_memory_bytes{{{N}}}", "{{instance}}")], "bytes"),
        panel("CPU", [(f"rate(process_cpu_seconds_total{{{N}}}[{RI}])", "{{instance}}")], "percentunit"),
        panel("Open file descriptors", [(f"process_open_fds{{{N}}}", "{{instance}}")]),
    ]),
]

DATASTORE = [
    ("Latency", [
        panel("p50 by operation", [(f"histogram_quantile(0.5, sum by (op, le) (rate(hydra_datastore_operation_duration_seconds_bucket{{{N}}}[{RI}])))", "{{op}}")], "s"),
        panel("p95 by operation", [(f"histogram_quantile(0.95, sum by (op, le) (rate(hydra_datastore_operation_duration_seconds_bucket{{{N}}}[{RI}])))", "{{op}}")], "s"),
        panel("p99 by operation", [(f"histogram_quantile(0.99, sum by (op, le) (rate(hydra_datastore_operation_duration_seconds_bucket{{{N}}}[{RI}])))", "{{op}}")], "s"),
        panel("Operations/s", [(f"sum by (op) (rate(hydra_datastore_operation_duration_seconds_count{{{N}}}[{RI}]))", "{{op}}")], "ops"),
    ]),
    ("Pool", [
        panel("Connections", [
            (f"sum(hydra_datastore_pool_connections{{{N}}})", "open"),
            (f"sum(hydra_datastore_pool_in_use{{{N}}})", "in use"),
        ]),
        panel("Waiting for a connection", [(f"sum(hydra_datastore_pool_waiting{{{N}}})", "waiting")]),
        panel("Pool wait p99", [(f"histogram_quantile(0.99, sum by (le) (rate(hydra_datastore_pool_wait_seconds_bucket{{{N}}}[{RI}])))", "p99")], "s"),
        panel("Errors/s", [(f"sum by (op) (rate(hydra_datastore_errors_total{{{N}}}[{RI}]))", "{{op}}")], "ops"),
    ]),
    ("Writes", [
        panel("Write buffer entries", [(f"hydra_providers_write_buffer_entries{{{N}}}", "{{instance}}")]),
        panel("Rows per flush (p50)", [(f"histogram_quantile(0.5, sum by (le) (rate(hydra_providers_flush_rows_bucket{{{N}}}[{RI}])))", "p50")]),
        panel("Failed flushes/s", [(f"sum(rate(hydra_providers_flush_failures_total{{{N}}}[{RI}]))", "failed")], "ops"),
    ]),
    ("Reads", [
        panel("Cache lookups/s", [(f"sum by (result) (rate(hydra_providers_cache_lookups_total{{{N}}}[{RI}]))", "{{result}}")], "ops"),
        panel("Keys pending a lookup", [(f"hydra_providers_reads_in_flight{{{N}}}", "{{instance}}")]),
    ]),
    ("Expiry and counts", [
        panel("Records (estimate)", [(f"max(hydra_providers_records_estimate{{{N}}})", "records")]),
        panel("Peers (estimate)", [(f"max(hydra_providers_peers_estimate{{{N}}})", "peers")]),
        panel("Seconds since last GC round", [(f"time() - max(hydra_providers_gc_last_run_timestamp_seconds{{{N}}})", "age")], "s",
              desc="Only the leaseholder runs GC; the age is over the fleet."),
        panel("GC leaseholders", [(f"sum(hydra_providers_gc_leader{{{N}}})", "leaders")]),
    ]),
]


def build(title, uid, rows, with_head):
    panels, y, pid = [], 0, 1
    for row_title, row in rows:
        panels.append({"type": "row", "title": row_title, "id": pid, "collapsed": False,
                       "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}, "panels": []})
        pid += 1
        y += 1
        for i, p in enumerate(row):
            w = 24 // min(len(row), 4)
            if i and i % 4 == 0:
                y += 8
            panels.append({
                "type": "stat" if p["kind"] == "stat" else "timeseries",
                "title": p["title"], "description": p["desc"], "id": pid, "datasource": DS,
                "gridPos": {"h": 8, "w": w, "x": (i % 4) * w, "y": y},
                "fieldConfig": {"defaults": {"unit": p["unit"]}, "overrides": []},
                "targets": [{"datasource": DS, "expr": e, "legendFormat": lf, "refId": chr(65 + j)}
                            for j, (e, lf) in enumerate(p["exprs"])],
            })
            pid += 1
        y += 8
    var = lambda name, query, label: {
        "name": name, "label": label, "type": "query", "datasource": DS,
        "query": {"query": query, "refId": name}, "definition": query,
        "includeAll": True, "multi": True, "allValue": ".*", "refresh": 2,
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]}}
    templating = [var("node", "label_values(hydra_kad_active_streams, instance)", "Node")]
    if with_head:
        templating.append(var("head", 'label_values(hydra_head_connections{instance=~"$node"}, head)', "Head"))
    return {"title": title, "uid": uid, "schemaVersion": 39, "version": 1, "editable": True,
            "time": {"from": "now-1h", "to": "now"}, "refresh": "30s", "tags": ["hydra"],
            "templating": {"list": templating}, "panels": panels}


here = pathlib.Path(__file__).parent
for name, dash in [
    ("hydra-overview.json", build("hydra: fleet overview", "hydra-overview", OVERVIEW, True)),
    ("hydra-datastore.json", build("hydra: datastore", "hydra-datastore", DATASTORE, False)),
]:
    (here / name).write_text(json.dumps(dash, indent=2) + "\n")
    print("wrote", here / name)
