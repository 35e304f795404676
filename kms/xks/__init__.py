"""The AWS KMS external key store (XKS) proxy, version 1 of AWS's XKS Proxy API, over PKCS#11.

AWS KMS calls ``POST https://HOST[/prefix]/kms/xks/v1`` + the operation, signed with SigV4 (service
``kms-xks-proxy``); each key store (its own path prefix, keys, credentials, quota and optional
secondary authorisation) answers GetKeyMetadata, Encrypt, Decrypt and GetHealthStatus with AES-GCM
run inside the token on keys ``hsm xks-key create`` made. Modules: ``config`` (the ``[xks]``
section), ``sigv4`` (verification of the received request), ``errors`` (the specification's
error names and statuses), ``handlers`` (the operations), ``worker`` (one process of
``kms serve`` for an XKS node), ``client`` (a botocore signer for tests and operators).
"""
