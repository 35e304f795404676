"""Tests of `kms.server`: real `kms serve` processes over mTLS."""
