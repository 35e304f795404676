"""The regional KMS as a network service: a JSON API over mutual TLS (``kms ... serve``).

One concern per module: ``settings`` (the strict ``[service]`` section), ``authz`` (identity
from the verified client certificate, the policy), ``errors`` (KMS errors -> HTTP statuses),
``audit`` (hash-chained JSON lines), ``metrics`` (Prometheus), ``guard`` (slow-client and
connection limits below HTTP), ``app`` (routes and handlers over a ``kms.node.node.Kms``),
``worker`` (one process: its own token login and node), ``supervisor`` (one listening socket,
N worker processes, signals). The node itself is the library ``kms.node.node.Kms``, unchanged.
"""
