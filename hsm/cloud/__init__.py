"""Cloud BYOK export: an AES key made in the HSM leaves it only wrapped, inside the token, to a
cloud provider's import key that the security officer trusted (AWS KMS, Google Cloud CSEK and
Cloud KMS, Azure Key Vault / Managed HSM, Alibaba Cloud KMS).

``keys`` makes the cloud key and the trusted provider keys, ``wrap`` does the in-token wraps (the
RSA-AES one composed where the token lacks CKM_RSA_AES_KEY_WRAP), ``providers`` knows each
provider's algorithms, files and next command.
"""
