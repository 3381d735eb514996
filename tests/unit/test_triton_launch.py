"""How the embedded Triton is launched: loopback binding and the stub's Python home."""
import re
import subprocess
from pathlib import Path

from common.triton import triton_command


def test_triton_binds_loopback_and_pins_the_stub_python_home(tmp_path):
    argv, env = triton_command(tmp_path, 1001, 1003, ["fused_ranker"])
    assert {"--grpc-address=127.0.0.1", "--metrics-address=127.0.0.1", "--allow-http=false"} <= set(argv)
    assert not any(a.startswith("--http-") for a in argv)   # HTTP off: nothing here needs it
    assert "--grpc-port=1001" in argv and "--load-model=fused_ranker" in argv
    # The stub's interpreter must read the standard library of the libpython it is linked with,
    # whatever `python3` comes first on PATH (an activated venv would point it at another build).
    stub = Path(argv[0]).parent.parent / "backends" / "python" / "triton_python_backend_stub"
    linked = subprocess.run(["ldd", str(stub)], capture_output=True, text=True, check=True).stdout
    version, library = re.search(r"libpython(\d+\.\d+)\S*\s+=>\s+(\S+)", linked).groups()
    first = Path(env["PATH"].split(":")[0])
    home = first.parent
    assert (first / f"python{version}").exists() and (home / "lib" / f"python{version}" / "os.py").exists()
    assert Path(library).resolve().is_relative_to(home)
