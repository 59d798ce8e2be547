"""/metrics for `llmkit serve` through prometheus-client, with vLLM's metric names under the `llmkit:` prefix.

The scheduler keeps its own counters and histograms; a collector reads them at scrape time (no second bookkeeping):
llmkit:num_requests_running / _waiting, llmkit:kv_cache_usage_perc, llmkit:prompt_tokens_total,
llmkit:generation_tokens_total, llmkit:request_success_total, llmkit:time_to_first_token_seconds,
llmkit:inter_token_latency_seconds (histograms), plus the HTTP side: llmkit:http_requests_total,
llmkit:request_rejected_total{reason=queue_full|rate_limit|body_too_large}, llmkit:scheduler_restarts_total.
Every series carries model_name, as vLLM's do.
"""
from __future__ import annotations

import collections
import threading

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily


class HttpCounters:
    """Counts the server's own events (thread-safe)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.requests = 0
        self.rejected: collections.Counter = collections.Counter()
        self.restarts = 0

    def count(self, what: str, reason: str | None = None):
        with self.lock:
            if what == "request":
                self.requests += 1
            elif what == "rejected":
                self.rejected[reason] += 1
            elif what == "restart":
                self.restarts += 1


class _Collector:
    def __init__(self, models, http: HttpCounters, guard=None):
        self.models, self.http, self.guard = models, http, guard  # guard: a callable giving the Guard or None

    def collect(self):
        lab = ["model_name"]
        g_run = GaugeMetricFamily("llmkit:num_requests_running", "Requests decoding now", labels=lab)
        g_wait = GaugeMetricFamily("llmkit:num_requests_waiting", "Requests waiting for a row", labels=lab)
        g_kv = GaugeMetricFamily("llmkit:kv_cache_usage_perc", "Fraction of the KV cache holding tokens", labels=lab)
        g_blocks = GaugeMetricFamily("llmkit:kv_cache_blocks", "KV cache blocks by state (reserved by running "
                                     "rows, cached prefixes, total in the pool)", labels=lab + ["state"])
        c_prompt = CounterMetricFamily("llmkit:prompt_tokens", "Prefilled prompt tokens", labels=lab)
        c_gen = CounterMetricFamily("llmkit:generation_tokens", "Generated tokens", labels=lab)
        c_req = CounterMetricFamily("llmkit:request_success", "Requests admitted to the scheduler", labels=lab)
        hists = [("llmkit:time_to_first_token_seconds", "Time to first token", "ttft"),
                 ("llmkit:inter_token_latency_seconds", "Time between two tokens of a request", "tpot")]
        h_out = [HistogramMetricFamily(n, d, labels=lab) for n, d, _ in hists]
        for m in list(self.models.values()):
            s = m.scheduler
            if s is None:  # an encoder: it embeds, it does not decode
                continue
            g_run.add_metric([m.name], s.batch_size)
            g_wait.add_metric([m.name], s.queue_length)
            g_kv.add_metric([m.name], _kv_usage(s))
            pool = m.engine.pool
            for state, n in (("reserved", pool.reserved), ("cached", pool.cached), ("total", pool.n_blocks)):
                g_blocks.add_metric([m.name, state], n)
            c_prompt.add_metric([m.name], s.stats.prompt_tokens)
            c_gen.add_metric([m.name], s.stats.generated_tokens)
            c_req.add_metric([m.name], s.stats.requests)
            for fam, (_, _, attr) in zip(h_out, hists):
                h = getattr(s.stats, attr)
                buckets = [(str(b), c) for b, c in zip(h.buckets, h.counts)] + [("+Inf", h.count)]
                fam.add_metric([m.name], buckets, h.sum)
        yield from (g_run, g_wait, g_kv, g_blocks, c_prompt, c_gen, c_req, *h_out)
        with self.http.lock:
            yield CounterMetricFamily("llmkit:http_requests", "HTTP requests to the API", value=self.http.requests)
            rej = CounterMetricFamily("llmkit:request_rejected", "Requests refused before decoding",
                                      labels=["reason"])
            queue_full = sum(m.scheduler.stats.rejected for m in list(self.models.values())
                             if m.scheduler is not None)
            rej.add_metric(["queue_full"], queue_full + self.http.rejected["queue_full"])
            for reason in ("rate_limit", "body_too_large"):
                rej.add_metric([reason], self.http.rejected[reason])
            yield rej
            yield CounterMetricFamily("llmkit:scheduler_restarts", "Scheduler threads restarted after dying",
                                      value=self.http.restarts)
        g = self.guard() if self.guard is not None else None
        if g is not None:  # llmkit.trust.guard: findings acted on, per policy category, direction and action
            fam = CounterMetricFamily("llmkit:guard_findings", "Guard findings acted on",
                                      labels=["category", "direction", "action"])
            for (cat, direction, act), n in sorted(g.counts.items()):
                fam.add_metric([cat, direction, act], n)
            yield fam


def _kv_usage(s) -> float:
    """Blocks reserved by running rows over the KV pool's size (vLLM's kv_cache_usage_perc, as a fraction)."""
    pool = s.engine.pool
    return pool.reserved / max(1, pool.n_blocks)


def registry(models: dict, http: HttpCounters, guard=None) -> CollectorRegistry:
    """A registry of its own per app (tests run several apps in one process); guard() gives the server's Guard."""
    reg = CollectorRegistry(auto_describe=False)
    reg.register(_Collector(models, http, guard))
    return reg


def render(reg: CollectorRegistry) -> bytes:
    """Prometheus text exposition of reg."""
    return generate_latest(reg)
