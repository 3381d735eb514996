"""How to start the embedded Triton Inference Server: the tritonserver binary shipped by the
PyPI package nvidia-pytriton, in its own virtual environment (it needs numpy<2)."""
from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from common.security import Security

REPO = Path(__file__).resolve().parent.parent


def triton_venv() -> Path:
    return Path(os.environ.get("FUSIONREC_TRITON_VENV", REPO / ".venv-triton"))


# The gRPC metadata key Triton's model-control API (load/unload) requires, with the per-stack
# secret as value (--grpc-restricted-protocol): only the ranking service is given the secret.
ADMIN_HEADER = "fusionrec-triton-admin"


def admin_headers(secret: str | None) -> dict[str, str] | None:
    """The `headers=` of a tritonclient model-control call (Triton expects the key prefixed)."""
    return {f"triton-grpc-protocol-{ADMIN_HEADER}": secret} if secret else None


def triton_command(model_repo: Path, grpc_port: int, metrics_port: int, models: list[str],
                   host: str = "127.0.0.1", *, security: "Security | None" = None,
                   admin_secret: str | None = None) -> tuple[list[str], dict[str, str]]:
    """-> (argv, environment) for a tritonserver bound to `host` with explicit model control.

    gRPC only (HTTP off: nothing here needs it); metrics on `host`. security (not insecure): mTLS,
    clients need a cert signed by its CA. admin_secret: the model-repository API (load, unload,
    index) answers only calls carrying ADMIN_HEADER with this value."""
    site = next((triton_venv() / "lib").glob("python3*/site-packages"), None)
    if site is None or not (site / "pytriton" / "tritonserver" / "bin" / "tritonserver").exists():
        raise FileNotFoundError(f"{triton_venv()}: no nvidia-pytriton install; run `make triton`")
    home = site / "pytriton" / "tritonserver"
    argv = [str(home / "bin" / "tritonserver"), f"--model-repository={Path(model_repo).resolve()}",
            f"--backend-directory={home / 'backends'}",
            f"--grpc-address={host}", f"--grpc-port={grpc_port}",
            "--allow-http=false",
            f"--metrics-address={host}", f"--metrics-port={metrics_port}",
            "--model-control-mode=explicit", *[f"--load-model={m}" for m in models],
            "--log-verbose=0", "--exit-timeout-secs=5"]
    if security is not None and not security.insecure:
        argv += ["--grpc-use-ssl-mutual=true", f"--grpc-server-cert={security.cert}",
                 f"--grpc-server-key={security.key}", f"--grpc-root-cert={security.ca}"]
    if admin_secret:
        argv.append(f"--grpc-restricted-protocol=model-repository:{ADMIN_HEADER}={admin_secret}")
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [str(site / "nvidia_pytriton.libs"),
                                                          env.get("LD_LIBRARY_PATH")]))
    # The python backend stub embeds the system Python and ignores PYTHONPATH: model.py reads this.
    env["FUSIONREC_TRITON_SITE"] = str(site)
    python_home = stub_python_home(home / "backends" / "python" / "triton_python_backend_stub")
    if python_home:
        # The stub's interpreter is isolated (ignores PYTHONHOME) and finds its prefix from the
        # `python3` on PATH: put the one matching its libpython first.
        env["PATH"] = os.pathsep.join(filter(None, [str(Path(python_home) / "bin"), env.get("PATH")]))
    return argv, env


def stub_python_home(stub: Path) -> str | None:
    """The prefix whose standard library matches the libpython the stub links against.

    Otherwise, with a virtual environment activated, the `python3` on PATH is another Python build
    (pyenv's) and the stub loads that build's extension modules: importing `ssl` (transformers ->
    huggingface_hub does) then fails with an undefined symbol.
    """
    try:
        linked = subprocess.run(["ldd", str(stub)], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"libpython(\d+\.\d+)\S*\s+=>\s+(\S+)", linked)
    if not match:
        return None
    version, library = match.groups()
    for prefix in Path(library).resolve().parents:
        if (prefix / "lib" / f"python{version}" / "os.py").exists():
            return str(prefix)
    return None
