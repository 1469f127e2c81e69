"""Beside the layers: the load harness (traffic generator, oracle, loadtest and bench with
its senders' HTTP client, report, verification, floor and CPU by stage) and
micro-benchmarks. It talks to a service over HTTP and to the stores; the service never
imports it, and its libraries are an extra (``pip install -e '.[harness]'``)."""
