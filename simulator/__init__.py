"""A simulated Kubernetes + KubeVirt cluster served over HTTP.

The real `kubectl` and the real kubernetes-asyncio client talk to it unchanged. It keeps a store
with resourceVersions and watch semantics, runs KubeVirt's migration behaviour on a scaled clock,
moves bytes by a published live-migration model, and records the ground truth that tests and
benchmarks read (`/sim/v1/stats`).

Layer rule: this package never imports `orchestrator` or `workers`; it speaks raw Kubernetes JSON.
"""
