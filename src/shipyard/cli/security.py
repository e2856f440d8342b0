"""The security commands: signing keys, signatures, and serving tokens."""

from __future__ import annotations

from pathlib import Path

import typer

from shipyard.cli._common import RegistryOption, err, out, registry_at

app = typer.Typer()
token_app = typer.Typer(help="API tokens for `shipyard serve --tokens`.", no_args_is_help=True)
app.add_typer(token_app, name="token")


@app.command()
def keygen(
    folder: Path | None = typer.Argument(None, help="Folder to write both files into (created if missing)."),
    private: Path = typer.Option(Path("shipyard-signing.pem"), "--private", help="Private key file to write."),
    public: Path = typer.Option(Path("shipyard-signing.pub.pem"), "--public", help="Public key file to write."),
) -> None:
    """Create an EC P-256 signing key pair (PEM): `shipyard keygen keys/`, or name the files."""
    from shipyard.artifact.signing import generate_keys

    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
        private, public = folder / private, folder / public
    generate_keys(private, public)
    err.print(f"[green]wrote[/] {private} (keep it secret) and {public} (give it to verifiers)")


@app.command("encryption-key")
def encryption_key(path: Path = typer.Argument(..., help="File to write the key to (created 0600).")) -> None:
    """Create an AES-256 key for encryption at rest; builds seal models when it is configured."""
    from shipyard.artifact.encryption import generate_key
    from shipyard.settings import KEY_FILE_ENV

    generate_key(path)
    err.print(f"[green]wrote[/] {path}; use it with: export {KEY_FILE_ENV}={path}")


@app.command()
def sign(
    ref: str = typer.Argument(..., help="NAME, NAME:VERSION or NAME@ALIAS."),
    key: Path = typer.Option(..., "--key", help="Private key (PEM) from `shipyard keygen`."),
    registry: str | None = RegistryOption,
) -> None:
    """Sign a registered version (OpenSSF model-signing format, model.sig beside its files)."""
    from shipyard.artifact.signing import sign as sign_folder

    reg = registry_at(registry)
    record = reg.resolve(ref)
    reg.manifest(record, verify=True)  # never sign files that already fail their own hashes
    path = sign_folder(reg.path(record), key)
    err.print(f"[green]signed[/] {record.ref}: {path}")


@app.command()
def verify(
    ref: str = typer.Argument(..., help="NAME, NAME:VERSION or NAME@ALIAS."),
    public_key: Path = typer.Option(..., "--public-key", help="Public key (PEM) the signature must match."),
    registry: str | None = RegistryOption,
) -> None:
    """Check a version's file hashes and its signature; exits non-zero if either fails."""
    from shipyard.artifact.signing import verify_signature

    reg = registry_at(registry)
    record = reg.resolve(ref)
    reg.manifest(record, verify=True)
    verify_signature(reg.path(record), public_key)
    out.print(f"[green]verified[/] {record.ref}: files match the manifest, signature matches {public_key}")


@token_app.command("add")
def token_add(
    file: Path = typer.Argument(..., help="Token file (created 0600 if missing)."),
    name: str = typer.Argument(..., help="Who holds the token."),
    scopes: list[str] = typer.Option(["infer:*"], "--scope", help="infer:*, infer:MODEL or admin; repeatable."),
    days: float | None = typer.Option(None, "--expires-in-days", help="Stop accepting it after this long."),
) -> None:
    """Create a token, store only its sha256, and print the token once."""
    import datetime

    from shipyard.serve.policy.auth import add_token

    expires = None if days is None else datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=days)
    token = add_token(file, name, scopes, expires)
    err.print(f"[green]added[/] {name} ({', '.join(scopes)}) to {file}; the token is shown once:")
    print(token)
