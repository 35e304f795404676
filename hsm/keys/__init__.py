"""Key management on the driver core: which keys exist, with which attributes, and how they leave.

:mod:`.attributes` states each kind of key's attributes as the token must hold them (set at
creation, read back); :mod:`.roles` names the long-term keys, :mod:`.keygen` makes them,
:mod:`.x509` and :mod:`.provision` certify them, :mod:`.officer` makes an officer's approval key;
:mod:`.export` makes release secrets that leave only under SO-trusted keys and keeps the release
records; :mod:`.byok`, :mod:`.kdf`, :mod:`.orgkek` and :mod:`.xks` are the token side of BYOK,
PBKDF2, per-org KEKs and AWS XKS keys.
"""
