"""PEP 517 backend: setuptools, plus the start-up hook file at the root of every wheel.

lm-eval 0.4.13 has no plugin discovery, so `--model xke` and `--tasks bizsre_*` work with the stock
`lm_eval` command only through a `.pth` file in site-packages that installs a tiny import hook
(`lm_eval_xke._startup`). setuptools cannot place a file at the wheel root, so this wrapper adds
`lm_eval_xke.pth` to the regular and the editable wheel and rewrites the wheel's RECORD.
"""

from __future__ import annotations

import base64
import hashlib
import os
import zipfile

from setuptools import build_meta as _setuptools
from setuptools.build_meta import *  # noqa: F401,F403  (re-export the rest of the PEP 517 interface)

PTH_NAME = "lm_eval_xke.pth"
# One import line: site.py executes it at interpreter start. The hook itself never raises and imports nothing heavy.
PTH_LINE = b"import lm_eval_xke._startup; lm_eval_xke._startup.install()\n"


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    name = _setuptools.build_wheel(wheel_directory, config_settings, metadata_directory)
    _add_pth(os.path.join(wheel_directory, name))
    return name


def build_editable(wheel_directory, config_settings=None, metadata_directory=None):
    name = _setuptools.build_editable(wheel_directory, config_settings, metadata_directory)
    _add_pth(os.path.join(wheel_directory, name))
    return name


def _record_hash(data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"sha256={digest}"


def _add_pth(wheel_path: str) -> None:
    tmp_path = wheel_path + ".tmp"
    with zipfile.ZipFile(wheel_path) as src, zipfile.ZipFile(tmp_path, "w", zipfile.ZIP_DEFLATED) as dst:
        record_name = next(n for n in src.namelist() if n.endswith(".dist-info/RECORD"))
        for item in src.infolist():
            if item.filename in (record_name, PTH_NAME):
                continue
            dst.writestr(item, src.read(item.filename))
        dst.writestr(PTH_NAME, PTH_LINE)
        record = [
            line for line in src.read(record_name).decode().splitlines() if line and not line.startswith(PTH_NAME + ",")
        ]
        record.insert(len(record) - 1, f"{PTH_NAME},{_record_hash(PTH_LINE)},{len(PTH_LINE)}")
        dst.writestr(record_name, "\n".join(record) + "\n")
    os.replace(tmp_path, wheel_path)
