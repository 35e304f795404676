"""Keys a customer holds, served through the node as DEK sources (``source.DekSource``).

``byok`` (the customer's secret RSA-OAEP-wrapped to the org's BYOK certificate, ``byok_pins``
the customer's pins of those certificates), ``cache_only`` (the DEK fetched per use from the
customer's key service as a JWE), ``ekm`` (the DEK wrapped by the customer's AWS KMS root key),
``outbound`` (the bounded calls to those services) and ``reference_service`` (the reference
customer key service the demo and the tests run).

Imports nothing itself: a node without customer-held keys never loads boto3 or jwcrypto.
"""
