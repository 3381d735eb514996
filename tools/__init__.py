"""Operator tooling on top of the services: the `fusionrec` CLI, the stack supervisor, the gateway
client, benchmarks, the load test, the evaluation driver and the GPU check. Nothing else imports it."""
