"""Opening KMS's CiphertextForRecipient: CMS EnvelopedData, RSAES-OAEP-SHA-256 key transport,
AES-256-CBC content, recipient identified by subjectKeyIdentifier.

Parsed with asn1crypto, which accepts BER (KMS output may use indefinite lengths).
"""

from __future__ import annotations

import hashlib

from asn1crypto import cms, keys
from cryptography.hazmat.primitives import hashes, padding
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.padding import MGF1, OAEP
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

OAEP_SHA256 = OAEP(mgf=MGF1(algorithm=hashes.SHA256()), algorithm=hashes.SHA256(), label=None)


class CmsError(ValueError):
    pass


def subject_key_identifier(public_key: rsa.RSAPublicKey) -> bytes:
    """RFC 5280 method 1: SHA-1 of the subjectPublicKey bit string."""
    spki = keys.PublicKeyInfo.load(public_key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo))
    return hashlib.sha1(spki["public_key"].contents[1:]).digest()


def open_enveloped_data(der: bytes, private_key: rsa.RSAPrivateKey) -> bytes:
    """Decrypt the content of an EnvelopedData addressed to private_key; raise CmsError otherwise."""
    try:
        info = cms.ContentInfo.load(der)
        if info["content_type"].native != "enveloped_data":
            raise CmsError(f"content type is {info['content_type'].native}, not enveloped_data")
        env = info["content"]
        ski = subject_key_identifier(private_key.public_key())
        encrypted_key = None
        for ri in env["recipient_infos"]:
            if ri.name != "ktri":
                continue
            ktri = ri.chosen
            rid = ktri["rid"]
            if rid.name == "subject_key_identifier" and rid.chosen.native != ski:
                continue
            if ktri["key_encryption_algorithm"]["algorithm"].native != "rsaes_oaep":
                raise CmsError("key transport is not RSAES-OAEP")
            params = ktri["key_encryption_algorithm"]["parameters"]
            if params["hash_algorithm"]["algorithm"].native != "sha256":
                raise CmsError("RSAES-OAEP hash is not SHA-256")
            encrypted_key = ktri["encrypted_key"].native
            break
        if encrypted_key is None:
            raise CmsError("no recipient info for this key")
        eci = env["encrypted_content_info"]
        alg = eci["content_encryption_algorithm"]
        if alg["algorithm"].native != "aes256_cbc":
            raise CmsError(f"content encryption is {alg['algorithm'].native}, not aes256_cbc")
        iv = alg["parameters"].native
        ciphertext = eci["encrypted_content"].native
    except CmsError:
        raise
    except Exception as exc:  # asn1crypto raises many types on malformed input
        raise CmsError(f"malformed EnvelopedData ({type(exc).__name__})") from None
    try:
        cek = private_key.decrypt(encrypted_key, OAEP_SHA256)
        dec = Cipher(algorithms.AES(cek), modes.CBC(iv)).decryptor()
        padded = dec.update(ciphertext) + dec.finalize()
        unpadder = padding.PKCS7(128).unpadder()
        return unpadder.update(padded) + unpadder.finalize()
    except ValueError:
        raise CmsError("EnvelopedData does not decrypt with this key") from None
