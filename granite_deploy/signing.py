"""Sign an artifact folder with a key pair and check it against its producer's public key.

Uses the OpenSSF `model-signing` library (pip extra `sign`): an elliptic-curve
private key (PEM) signs a Sigstore bundle over the sha256 of every file in the
folder, `manifest.json` included, so a one-byte change to any file, an edited
manifest, or an added/removed file breaks the signature. The signature lives
next to the folder (`ARTIFACT.sig` by default), not inside it, so signing does
not change what the manifest lists.

    granite-deploy sign ARTIFACT --key producer.pem               # writes ARTIFACT.sig
    granite-deploy verify ARTIFACT --signature ARTIFACT.sig --public-key producer.pub.pem
"""

from __future__ import annotations

from pathlib import Path

from .errors import InvalidField, VerificationFailed

EXTRA = 'pip install "granite-deploy[sign]"'


class SignatureError(VerificationFailed):
    """The signature does not match the artifact or the key (exit 3)."""


def _library():
    try:
        from model_signing import signing, verifying

        return signing, verifying
    except ImportError as exc:
        raise InvalidField("--key/--public-key", f"signing needs the model-signing library ({exc.name} is missing): "
                                                 f"{EXTRA}") from exc


def default_signature_path(artifact: str | Path) -> Path:
    artifact = Path(artifact).resolve()
    return artifact.with_name(artifact.name + ".sig")


def _pem(path: str | Path, option: str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise InvalidField(option, f"{path}: no such file")
    head = path.read_bytes()[:200]
    if b"-----BEGIN" not in head:
        raise InvalidField(option, f"{path}: not a PEM key file")
    return path


def sign(artifact: str | Path, private_key: str | Path, signature: str | Path | None = None,
         password: str | None = None) -> Path:
    """Verify the artifact (paths, sizes, hashes), then sign the whole folder; returns the signature path."""
    from .artifact import open_trusted

    key = _pem(private_key, "--key")
    artifact = Path(artifact)
    open_trusted(artifact, verify_hashes=True)  # never sign what does not verify against its own manifest
    out = Path(signature) if signature else default_signature_path(artifact)
    if out.resolve().is_relative_to(artifact.resolve()):
        raise InvalidField("--signature", f"{out}: inside the artifact folder; write it next to the folder")
    signing, _ = _library()
    try:
        signing.Config().use_elliptic_key_signer(private_key=key, password=password).sign(artifact, out)
    except ValueError as exc:  # a key that is not an elliptic-curve private key, a wrong password
        raise InvalidField("--key", f"{key}: cannot sign with it ({exc})") from exc
    return out


def verify_signature(artifact: str | Path, signature: str | Path, public_key: str | Path) -> None:
    """SignatureError unless `signature` is a valid signature of exactly this folder's files by `public_key`."""
    signature = Path(signature)
    if not signature.is_file():
        raise InvalidField("--signature", f"{signature}: no such file")
    key = _pem(public_key, "--public-key")
    _, verifying = _library()
    try:
        verifying.Config().use_elliptic_key_verifier(public_key=key).verify(Path(artifact), signature)
    except Exception as exc:  # model_signing raises ValueError (and others from the bundle parser)
        import re

        text = str(exc)
        changed = sorted(set(re.findall(r"Hash mismatch for '([^']+)'", text)))
        detail = (f"files differ from what was signed: {', '.join(changed)}" if changed
                  else text.splitlines()[0][:300] if text else type(exc).__name__)
        raise SignatureError(f"{artifact}: signature {signature} does not verify with {key}: {detail}") from exc
