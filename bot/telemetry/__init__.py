"""What operators see from outside: Prometheus metrics (`metrics`) and the HTTP endpoint that
serves them beside the health probes (`probes`: `/metrics`, `/healthz`, `/readyz`).

The lowest package: any layer may record a metric, and this package imports nothing of the
bot. Labels are low-cardinality by rule: an outcome, a status code, a reason; never a
channel, user or server id.
"""
