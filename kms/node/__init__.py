"""The KMS node: a ``Kms`` (``node``) started from its configuration (``config``, ``limits``),
holding the imported releases (``importer``), each org's state sealed in the HSM (``sealing``,
``orgid``), deriving DEKs in the token (``derive``) and keeping the hot path's store reads
(``rowcache``); ``advice`` says what an operator can do next when an org has no usable key.

Imports nothing itself: ``import kms.node.config`` loads only what that module needs.
"""
