"""PyKMIP's server for the comparison benchmark: mutual TLS (TLS 1.2 suite, client certificates
required and checked for clientAuth) on 127.0.0.1, its own SQLite database in a temp directory.
``python _kmip_server.py TLS_DIR PORT WORK_DIR``; prints "serving"; SIGINT stops it."""

import logging
import sys
import warnings

warnings.simplefilter("ignore")   # PyKMIP imports algorithms cryptography marks deprecated
from kmip.services.server import KmipServer  # noqa: E402

logging.basicConfig(level=logging.ERROR)
tls, port, work = sys.argv[1], int(sys.argv[2]), sys.argv[3]
server = KmipServer(hostname="127.0.0.1", port=port, certificate_path=f"{tls}/server.pem",
                    key_path=f"{tls}/server.key", ca_path=f"{tls}/ca.pem", auth_suite="TLS1.2",
                    config_path=None, log_path=f"{work}/kmip-server.log", policy_path=None,
                    enable_tls_client_auth=True, database_path=f"{work}/kmip.db")
with server:
    print("serving", flush=True)
    server.serve()
