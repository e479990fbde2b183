"""BloodMNIST through medmnist's file layout: `bloodmnist.npz` or `bloodmnist_{64,128,224}.npz`
in a root folder, checked against medmnist's MD5s and downloaded by medmnist when absent."""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from ssl_blood.data.sources import register
from ssl_blood.data.sources.npz import NpzSource
from ssl_blood.errors import UserError
from ssl_blood.files import file_digest

ENV_DATA_ROOT = "SSL_BLOOD_DATA_ROOT"
BLOODMNIST_SIZES = (28, 64, 128, 224)


@lru_cache(maxsize=1)
def medmnist_info():
    """medmnist's `info` module (INFO: class names, MD5s, URLs; DEFAULT_ROOT), read from
    medmnist/info.py without importing the package, whose __init__ loads its torch datasets and
    evaluator: about 1.5 s added to every command that only needs the table."""
    package = importlib.util.find_spec("medmnist")
    if package is None or package.origin is None:
        import medmnist.info as info  # an unusual install: the plain import

        return info
    spec = importlib.util.spec_from_file_location("ssl_blood._medmnist_info",
                                                  Path(package.origin).with_name("info.py"))
    info = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(info)  # type: ignore[union-attr]
    return info


def default_data_root() -> str:
    """`SSL_BLOOD_DATA_ROOT` if set, else medmnist's default root (~/.medmnist)."""
    return os.environ.get(ENV_DATA_ROOT) or medmnist_info().DEFAULT_ROOT


@register
@dataclass(frozen=True)
class BloodMnistSource(NpzSource):
    """BloodMNIST at one of medmnist's sizes; `path` is the root folder holding its files."""

    size: int = 28

    kind = "bloodmnist"
    param = "data_root"
    metavar = "DIR"
    help = f"medmnist root holding bloodmnist.npz (default: ${ENV_DATA_ROOT}, else ~/.medmnist)"
    rank = 0

    @classmethod
    def resolve(cls, value: str | None, size: int | None, **options: Any) -> "BloodMnistSource":
        size = size or 28
        if size not in BLOODMNIST_SIZES:
            raise UserError(f"`size` {size} is not a BloodMNIST size; use one of "
                            f"{BLOODMNIST_SIZES}", param="size")
        root = value if value is not None else default_data_root()
        return cls(str(Path(root).expanduser().resolve()), size)

    @property
    def name(self) -> str:
        return "bloodmnist" if self.size == 28 else f"bloodmnist_{self.size}"

    @property
    def file(self) -> Path:
        return Path(self.path) / f"{self.name}.npz"

    def npz_file(self) -> Path:
        path = self.file
        if not path.exists():
            self._download()
        self._verify_md5(path)
        return path

    def _download(self) -> None:
        """Fetch the file through medmnist; offline, say where to put it. A root that does not
        exist is refused rather than created (a mistyped path stays a mistake, not a folder)."""
        root = Path(self.path)
        if not root.is_dir():
            raise UserError(f"`data_root` {root}: no such folder; give the folder holding "
                            f"bloodmnist.npz (or create it to let medmnist download there)",
                            param="data_root")
        from medmnist import BloodMNIST

        try:
            BloodMNIST(split="train", root=self.path, download=True, size=self.size)
        except Exception:  # medmnist wraps every failure in a bare RuntimeError
            flag = "" if self.size == 28 else f"_{self.size}"
            url = medmnist_info().INFO["bloodmnist"][f"url{flag}"]
            raise UserError(
                f"{self.file.name} is not in {self.path} and the download failed; download {url} "
                f"and put it there, or point `data_root` / {ENV_DATA_ROOT} at a folder that has "
                f"it", param="data_root") from None
        if not self.file.exists():
            raise UserError(f"medmnist did not leave {self.file.name} in {self.path}; download "
                            f"it by hand", param="data_root")

    def _verify_md5(self, path: Path) -> None:
        expected = medmnist_info().INFO["bloodmnist"]["MD5" if self.size == 28 else f"MD5_{self.size}"]
        actual = file_digest(path, "md5")
        if actual != expected:
            raise UserError(f"{path} has MD5 {actual}, not medmnist's {expected} (truncated or "
                            f"altered); delete it and download it again", param="data_root")

    def medmnist_flag(self) -> str:
        return "bloodmnist"
